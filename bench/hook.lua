-- The benchmark's Lua hook: a small edit, as a real deployment's hook would do. It reads
-- user.id (so the body is parsed) and adds one field (so it is re-serialized), then forwards the
-- record on the route's own mode. bench/run compares /async with and without it.

function on_request(req)
  local id = req:get("user.id")
  req:set("user_seen", id ~= nil)
  return forward()
end
