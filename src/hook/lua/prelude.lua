-- The prelude every hook script gets before its own code runs (src/hook/lua/state.rs).
-- pcall and xpcall would catch the budget error and let a script run on; once the budget is
-- spent they pass the error on instead. xpcall's message handler runs where the error is
-- raised, and the budget's error is raised from the budget check itself, where Lua turns the
-- checks off: a handler left to run then would run unchecked (and a loop in it for ever). So
-- once the budget is spent the handler hands the error on untouched.
local exhausted = __kafboy_exhausted
__kafboy_exhausted = nil
do
  local raw_pcall, raw_xpcall, error, type = pcall, xpcall, error, type
  local pack, unpack = table.pack, table.unpack
  local function check(r)
    if not r[1] and exhausted() then error(r[2], 0) end
    return unpack(r, 1, r.n)
  end
  pcall = function(...) return check(pack(raw_pcall(...))) end
  xpcall = function(f, handler, ...)
    if type(handler) == "function" then
      local script_handler = handler
      handler = function(e)
        if exhausted() then return e end
        return script_handler(e)
      end
    end
    return check(pack(raw_xpcall(f, handler, ...)))
  end
end
-- Strings share one metatable: a script could give them a __close (a C function as the closer
-- runs free of the budget, once per frame as an error unwinds) or other metamethods. It is
-- read-only to scripts (the `string` table, its __index, stays the script's).
getmetatable("").__metatable = false
-- A finalizer runs with hooks off, so no budget could stop it: scripts get none.
do
  local raw_setmetatable, rawget, type, error = setmetatable, rawget, type, error
  setmetatable = function(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
      error("__gc is not allowed in hooks: a finalizer would run outside the budgets", 2)
    end
    return raw_setmetatable(t, mt)
  end
end
-- Library loops that run in C, where no instruction count reaches them, are held to what they
-- produce: an empty string repeated, or a move or shift over a length a __len made up, would
-- otherwise loop for as long as a 64-bit count lasts. Counts are converted as the C functions
-- convert them (numeric strings included) before they are checked. A table with a metatable
-- (whose __len may answer anything, and differently each time), or whose length is past the
-- limit (a length is any border: {[1]=1, [2]=1, [4]=1, ..., [2^40]=1} may have one near 2^40),
-- is shifted here, in Lua, where the budget sees every step. So is a table with a metatable
-- that a move or an unpack reads or writes element by element: C would call its __index or
-- __newindex from its loop, and a C function there (another unpack) runs no instruction at
-- all, so each step of the loop could be a million steps of unchecked work.
do
  local rep, move, insert, remove, unpack =
    string.rep, table.move, table.insert, table.remove, table.unpack
  local error, type, tostring, tonumber, toint, getmetatable, select, rawlen =
    error, type, tostring, tonumber, math.tointeger, getmetatable, select, rawlen
  local LIMIT = 1000000
  local function int(x)
    local n = tonumber(x)
    return n and toint(n)
  end
  local function empty(s)
    return (type(s) == "string" or type(s) == "number") and #tostring(s) == 0
  end
  string.rep = function(s, n, sep)
    local count = int(n)
    if count and count > 1 and empty(s) and (sep == nil or empty(sep)) then
      return ""
    end
    return rep(s, count or n, sep)
  end
  local maxinteger = math.maxinteger
  -- ltablib.c's tmove, for tables with metatables.
  local function lua_move(a1, f, e, t, a2)
    if e >= f then
      if not (f > 0 or e < maxinteger + f) then
        error("bad argument #3 to 'move' (too many elements to move)", 3)
      end
      local n = e - f + 1
      if t > maxinteger - n + 1 then
        error("bad argument #4 to 'move' (destination wrap around)", 3)
      end
      if t > e or t <= f or a1 ~= a2 then
        for i = 0, n - 1 do a2[t + i] = a1[f + i] end
      else
        for i = n - 1, 0, -1 do a2[t + i] = a1[f + i] end
      end
    end
    return a2
  end
  table.move = function(a1, f, e, t, a2)
    local first, last, to = int(f), int(e), int(t)
    -- In floats: integers would wrap around on the widest ranges.
    if first and last and (last + 0.0) - first > LIMIT then
      error("table.move of more than " .. LIMIT .. " elements", 2)
    end
    local dest = a2
    if dest == nil then dest = a1 end
    if first and last and to and type(a1) == "table" and type(dest) == "table"
        and (getmetatable(a1) ~= nil or getmetatable(dest) ~= nil) then
      return lua_move(a1, first, last, to, dest)
    end
    return move(a1, first or f, last or e, t, a2)
  end
  table.unpack = function(t, i, j)
    local first, last = int(i), int(j)
    -- Bad arguments, and plain tables: the C function.
    if type(t) ~= "table" or getmetatable(t) == nil or (i ~= nil and not first)
        or (j ~= nil and not last) then
      return unpack(t, i, j)
    end
    first = first or 1
    last = last or int(#t) or error("object length is not an integer", 2)
    if first > last then return end
    if (last + 0.0) - first >= LIMIT then error("too many results to unpack", 2) end
    local copy = {}
    for k = first, last do
      copy[k] = t[k]
    end
    return unpack(copy, first, last)
  end
  local function lua_insert(t, ...)
    local e = #t + 1
    local n = select('#', ...)
    if n == 1 then
      t[e] = ...
      return
    elseif n ~= 2 then
      error("wrong number of arguments to 'insert'", 2)
    end
    local pos, v = ...
    local p = int(pos) or error("bad argument #2 to 'insert' (number expected)", 2)
    if p < 1 or p > e then
      error("bad argument #2 to 'insert' (position out of bounds)", 2)
    end
    for i = e, p + 1, -1 do
      t[i] = t[i - 1]
    end
    t[p] = v
  end
  local function lua_remove(t, ...)
    local size = #t
    local pos = size
    local given = ...
    if given ~= nil then
      pos = int(given) or error("bad argument #2 to 'remove' (number expected)", 2)
    end
    if pos ~= size and (pos < 1 or pos > size + 1) then
      error("bad argument #2 to 'remove' (position out of bounds)", 2)
    end
    local v = t[pos]
    while pos < size do
      t[pos] = t[pos + 1]
      pos = pos + 1
    end
    t[pos] = nil
    return v
  end
  local function shifted_here(t)
    return type(t) == "table" and (getmetatable(t) ~= nil or rawlen(t) > LIMIT)
  end
  local function either(in_lua, in_c)
    return function(t, ...)
      if shifted_here(t) then
        return in_lua(t, ...)
      end
      return in_c(t, ...)
    end
  end
  table.insert = either(lua_insert, insert)
  table.remove = either(lua_remove, remove)
  -- sort and concat read the length and the elements as their C loops go: a table with a
  -- metatable (a __len that makes up a length, an __index that makes up elements) is copied
  -- into a plain one here first, where the budget sees every step. A comparator that is a C
  -- function (rawequal, math.max) is called through Lua, so that a sort's comparisons are not
  -- free of the budget; string.dump tells one (it cannot dump a C function).
  local sort, concat, dump, pcall, setmetatable = table.sort, table.concat, string.dump, pcall,
    setmetatable
  table.sort = function(t, comp)
    -- One sort of a large table is a long C call: none starts once the budget is spent (a
    -- to-be-closed variable's closer runs after the budget's error).
    if exhausted() then error("the hook's budget is spent", 2) end
    local order = comp
    if type(comp) == "function" and not pcall(dump, comp, true) then
      order = function(a, b) return comp(a, b) end
    end
    if type(t) ~= "table" or getmetatable(t) == nil then
      return sort(t, order)
    end
    -- The length as C reads it, once; the copy keeps it whatever holes it has.
    local n = int(#t) or error("object length is not an integer", 2)
    local copy = {}
    for i = 1, n do
      copy[i] = t[i]
    end
    sort(setmetatable(copy, { __len = function() return n end }), order)
    for i = 1, n do
      t[i] = copy[i]
    end
  end
  table.concat = function(t, sep, i, j)
    local first, last = int(i), int(j)
    -- Bad arguments: the C function says what is wrong with them.
    if type(t) ~= "table" or getmetatable(t) == nil or (i ~= nil and not first)
        or (j ~= nil and not last) then
      return concat(t, sep, i, j)
    end
    first, last = first or 1, last or #t
    local copy = {}
    for k = first, last do
      copy[k] = t[k]
    end
    return concat(copy, sep, first, last)
  end
end
-- One read-only table for every forward(): nothing to allocate, and the host knows it on sight.
do
  local error = error
  local verdict = setmetatable({}, {
    __index = { action = "forward" },
    __newindex = function() error("forward() is read-only", 2) end,
  })
  __kafboy_forward = verdict
  function forward() return verdict end
end
function reject(status, message) return { action = "reject", status = status, message = message } end
function respond(status, body, produce) return { action = "respond", status = status, body = body, produce = produce } end
