--[[
greend cli_filter: route plain `sbatch` submissions through greend's policy (docs/policy.md).

Install on each cluster's login nodes: add `CliFilterPlugins=cli_filter/lua` to that cluster's
slurm.conf and put this file, as cli_filter.lua, in the same directory. Set CLUSTER to the cluster's
name in greend's configuration and MODE to advise or enforce (or GREEND_CLUSTER,
GREEND_CLI_FILTER_MODE in the environment).

It asks the greend daemon running on the login node (POST /api/v1/route on its unix socket, with
curl), which answers from cluster state it keeps warm; greend knows the user from the socket.

  advise   the job is submitted as asked; greend's partition/--begin/--nice are applied when it
           agrees with this cluster, and a note says where greend would have sent it otherwise.
  enforce  a job that greend routes elsewhere, or refuses (budget), is rejected with the reason;
           the user submits it with `greend submit SCRIPT`.

greend failing never blocks a submission: when the daemon is absent, slower than TIMEOUT_S, or
cannot route, the job goes as asked and a note on stderr says so. Jobs that `greend submit` sends
carry GREEND_SUBMIT in their environment and are left alone (already routed). A cli_filter runs in
the user's own sbatch process: it is advice a user can bypass (another SLURM_CONF); a job_submit
plugin on the controller would be needed to enforce anything strictly.
--]]

local CLUSTER = os.getenv("GREEND_CLUSTER") or "site"
local MODE = os.getenv("GREEND_CLI_FILTER_MODE") or "advise"
local SOCKET = os.getenv("GREEND_SOCKET") or "/run/greend/api.sock"
local TIMEOUT_S = os.getenv("GREEND_TIMEOUT_S") or "1"  -- the most greend may add to an sbatch
local CURL = os.getenv("GREEND_CURL") or "/usr/bin/curl"
local MAX_SCRIPT = 32768  -- bytes of the script's directive lines sent (greend's limit)

local function shell_quote(s)
  return "'" .. string.gsub(s, "'", "'\\''") .. "'"
end

local function json_string(s)
  local out = string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. out .. '"'
end

-- The script's directive lines (#SBATCH, #GREEND), read here as the user: the daemon never opens
-- a file a user names. sbatch has already applied the #SBATCH ones to the options.
local function script_directives(options_json)
  local path = string.match(options_json, '"argv"%s*:%s*%[%s*"([^"\\]*)"')
  if path == nil or path == "" then
    return nil
  end
  local f = io.open(path, "r")
  if f == nil then
    return nil
  end
  local lines = {}
  local size = 0
  for line in f:lines() do
    local s = string.match(line, "^%s*(.-)%s*$")
    if s ~= "" and string.sub(s, 1, 1) ~= "#" then
      break  -- sbatch stops reading directives at the first command
    end
    size = size + #line + 1
    if size > MAX_SCRIPT then
      break
    end
    lines[#lines + 1] = line
  end
  f:close()
  return table.concat(lines, "\n") .. "\n"
end

local function fail_open(why)
  return { verdict = "error", set = {},
           message = "greend: " .. why .. "; the job is submitted as asked" }
end

local function ask_greend(options)
  local options_json = slurm.json_cli_options(options)
  if options_json == nil or options_json == "" then
    return fail_open("no options to route")
  end
  local body = '{"sbatch":' .. options_json .. ',"cli_filter":' .. json_string(CLUSTER)
  local text = script_directives(options_json)
  if text ~= nil then
    body = body .. ',"script_text":' .. json_string(text)
  end
  body = body .. "}"
  local path = os.tmpname()
  local f = io.open(path, "w")
  if f == nil then
    return fail_open("cannot write a temporary file")
  end
  f:write(body)
  f:close()
  local cmd = shell_quote(CURL) .. " -sS --max-time " .. shell_quote(TIMEOUT_S)
      .. " --unix-socket " .. shell_quote(SOCKET)
      .. " -H 'Content-Type: application/json' --data-binary @" .. shell_quote(path)
      .. " -w '\\n%{http_code}\\n' http://greend/api/v1/route 2>&1"
  local p = io.popen(cmd, "r")
  local lines = {}
  if p ~= nil then
    for line in p:lines() do
      lines[#lines + 1] = line
    end
    p:close()
  end
  os.remove(path)
  local code = table.remove(lines)
  while code == "" do
    code = table.remove(lines)
  end
  if code ~= "200" then
    local why = table.concat(lines, " ")
    why = string.match(why, '"error"%s*:%s*"(.-)"}') or string.match(why, "(curl: .*)") or why
    if code == nil or code == "000" then
      return fail_open("greend did not answer within " .. TIMEOUT_S .. " s on " .. SOCKET
                       .. " (" .. why .. ")")
    end
    return fail_open("greend could not route this job (HTTP " .. code .. ": " .. why .. ")")
  end
  local answer = { set = {} }
  for _, line in ipairs(lines) do
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
