--[[
greend cli_filter: route plain `sbatch` submissions through greend's policy (docs/policy.md).

Install on each cluster's login nodes: add `CliFilterPlugins=cli_filter/lua` to that cluster's
slurm.conf and put this file, as cli_filter.lua, in the same directory. Set CLUSTER to the cluster's
name in greend's configuration, GREEND to greend's path, MODE to advise or enforce.

  advise   the job is submitted as asked; greend's partition/--begin/--nice are applied when it
           agrees with this cluster, and a note says where greend would have sent it otherwise.
  enforce  a job that greend routes elsewhere, or refuses (budget), is rejected with the reason;
           the user submits it with `greend submit SCRIPT`.

greend failing (not installed, bad configuration) never blocks a submission. Jobs that
`greend submit` sends carry GREEND_SUBMIT in their environment and are left alone (already routed).
A cli_filter runs in the user's own sbatch process: it is advice a user can bypass (another
SLURM_CONF); a job_submit plugin on the controller would be needed to enforce anything strictly.
--]]

local GREEND = os.getenv("GREEND_BIN") or "/usr/bin/greend"
local CLUSTER = os.getenv("GREEND_CLUSTER") or "site"
local MODE = os.getenv("GREEND_CLI_FILTER_MODE") or "advise"
local CONFIG = os.getenv("GREEND_CONFIG")  -- greend's own default applies when unset

local function shell_quote(s)
  return "'" .. string.gsub(s, "'", "'\\''") .. "'"
end

local function ask_greend(options)
  local path = os.tmpname()
  local f = io.open(path, "w")
  if f == nil then
    return nil
  end
  f:write(slurm.json_cli_options(options))
  f:close()
  local cmd = shell_quote(GREEND)
  if CONFIG ~= nil and CONFIG ~= "" then
    cmd = cmd .. " --config " .. shell_quote(CONFIG)
  end
  cmd = cmd .. " route --cli-filter " .. shell_quote(CLUSTER) .. " --sbatch-json " .. shell_quote(path)
      .. " 2>/dev/null"
  local p = io.popen(cmd, "r")
  local answer = { set = {} }
  if p ~= nil then
    for line in p:lines() do
      local k, v = string.match(line, "^set ([%w%-]+)=(.*)$")
      if k ~= nil then
        answer.set[k] = v
      else
        k, v = string.match(line, "^(%w+)=(.*)$")
        if k ~= nil then
          answer[k] = v
        end
      end
    end
    p:close()
  end
  os.remove(path)
  return answer
end

function slurm_cli_setup_defaults(options, early_pass)
  return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, pack_offset)
  if options["type"] ~= "sbatch" or os.getenv("GREEND_SUBMIT") ~= nil then
    return slurm.SUCCESS
  end
  local a = ask_greend(options)
  if a == nil or a.verdict == nil or a.verdict == "error" then
    if a ~= nil and a.message ~= nil then
      io.stderr:write(a.message .. "\n")
    end
    return slurm.SUCCESS
  end
  if a.verdict == "accept" then
    for k, v in pairs(a.set) do
      options[k] = v
    end
    if a.message ~= nil then
      io.stderr:write(a.message .. "\n")
    end
    return slurm.SUCCESS
  end
  -- redirect or refuse
  io.stderr:write((a.message or "greend: not this cluster") .. "\n")
  if MODE == "enforce" then
    return slurm.ERROR
  end
  return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, job_id, step_id)
  return slurm.SUCCESS
end
