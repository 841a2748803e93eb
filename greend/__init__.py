"""greend: per-job energy, carbon and water for research compute, and frugal routing of jobs.

`import greend` stays light: the Python API (`greend.track`, docs/python.md) and the notebook
extension load on first use.
"""

__version__ = "0.1.0"

_LAZY = {"track": "greend.track", "Run": "greend.track", "Phase": "greend.track",
         "Footprint": "greend.track", "load_ipython_extension": "greend.notebook"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'greend' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(mod)
    if name == "track":  # the submodule, callable as track() (greend/track.py)
        return module
    value = globals()[name] = getattr(module, name)
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
