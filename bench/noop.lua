-- The least a Lua hook can be: forwards every request untouched. bench/callgrind --hook
-- bench/noop.lua measures what entering Lua costs per request, apart from any work a script does.

function on_request(req)
  return forward()
end
