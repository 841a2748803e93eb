"""The Textual app behind `greend tui`."""
