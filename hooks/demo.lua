-- The demo hook: the original kafboy's massage_json, in Lua.
--
-- kafboy calls on_request(req) for every produce request on the routes this script is set for,
-- and on_error(status, message, topic, request_id) for every request that failed.
--
-- req gives: req:topic(), req:mode(), req:kind(), req:method(), req:path(), req:query([name]),
-- req:header(name), req:peer(), req:request_id(), req:body(), req:get(path), req:fields(),
-- req:key();
-- and edits: req:set_topic(t), req:set_body(s), req:set(path, v), req:delete(path),
-- req:set_key(k), req:set_partition(n), req:set_header(name, value).
-- Return forward() (or nothing) to produce, reject(status, message) to refuse,
-- respond(status, body[, mode]) to answer yourself and then, with a mode, produce the record.

function on_request(req)
  -- Nothing to write: refuse, naming the topic.
  if #req:body() == 0 then
    return reject(400, req:topic() .. ".insufficient")
  end

  -- Several records, one per line (NDJSON): nothing to massage; produce them as they are.
  if req:kind() == "ndjson" then
    return forward()
  end

  -- Exactly one field, "hello", a string: produce that string, and reply as the route
  -- normally does.
  local fields = req:fields()
  if fields and #fields == 1 and fields[1] == "hello" and type(req:get("hello")) == "string" then
    req:set_body(req:get("hello"))
    return forward()
  end

  -- Anything else: reply at once, then produce on the batching path, with a field added to an
  -- object (an array or a lone value goes as it is).
  if fields then
    req:set("extra", "true")
  end
  return respond(200, '{"ok":"fast reply"}', "batch_async")
end

function on_error(status, message, topic, request_id)
  print("some " .. status .. " error: " .. message .. " (topic " .. tostring(topic) .. ")")
end
