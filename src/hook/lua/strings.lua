-- string.find, match, gmatch and gsub for hooks: the Lua half of src/hook/lua/strings.rs,
-- whose functions do the searching under the hook's budget and answer `false, message` where
-- the C library would raise an error. The error is raised here, as C raises it: a string,
-- with the position of the script's line that called the library (level 2 from a function the
-- wrapper tail-calls, level 3 from one it calls and returns from). Everything it uses is kept
-- in a local, so a script that replaces a global cannot change it.
local find, gsub, step = ...
local error, type, tostring, tonumber, toint = error, type, tostring, tonumber, math.tointeger
local sub, byte, concat = string.sub, string.byte, table.concat

local function check(ok, ...)
  if ok then return ... end
  error((...), 2)
end

local function text(v, i, name)
  local t = type(v)
  if t == "string" then return v elseif t == "number" then return tostring(v) end
  error("bad argument #" .. i .. " to '" .. name .. "' (string expected, got " .. t .. ")", 3)
end

local function integer(v, i, name)
  local n = tonumber(v)
  local int = n and toint(n)
  if int then return int end
  local why = n and "number has no integer representation" or ("number expected, got " .. type(v))
  error("bad argument #" .. i .. " to '" .. name .. "' (" .. why .. ")", 3)
end

string.find = function(s, p, init, plain) return check(find(true, s, p, init, plain)) end
string.match = function(s, p, init) return check(find(false, s, p, init)) end

string.gmatch = function(s, p, init)
  s, p = text(s, 1, "gmatch"), text(p, 2, "gmatch")
  local at, last = 0, -1
  if init ~= nil then
    local n = integer(init, 3, "gmatch")
    if n > 0 then at = n - 1 elseif n < -#s then at = 0 elseif n < 0 then at = #s + n end
    if at > #s then at = #s + 1 end
  end
  local function on(a, e, ...)
    if a == false then error(e, 2) end
    if a == nil then return end
    at, last = e, e
    return ...
  end
  return function() return on(step(s, p, at, last, false)) end
end

string.gsub = function(s, p, repl, n)
  local tr = type(repl)
  if tr == "string" or tr == "number" then return check(gsub(s, p, repl, n)) end
  s, p = text(s, 1, "gsub"), text(p, 2, "gsub")
  local max = #s + 1
  if n ~= nil then max = integer(n, 4, "gsub") end
  if tr ~= "function" and tr ~= "table" then
    error("bad argument #3 to 'gsub' (string/function/table expected, got " .. tr .. ")", 2)
  end
  local anchored = byte(p, 1) == 94
  local pieces, k, count, at, last = {}, 0, 0, 0, -1
  local function on(a, e, ...)
    if a == false then error(e, 3) end
    if a == nil then return false end
    local v
    if tr == "function" then v = repl(...) else v = repl[(...)] end
    if not v then
      v = sub(s, a + 1, e)
    elseif type(v) == "number" then
      v = tostring(v)
    elseif type(v) ~= "string" then
      error("invalid replacement value (a " .. type(v) .. ")", 3)
    end
    pieces[k + 1], pieces[k + 2] = sub(s, at + 1, a), v
    k, at, last, count = k + 2, e, e, count + 1
    return true
  end
  while count < max and on(step(s, p, at, last, true)) and not anchored do end
  pieces[k + 1] = sub(s, at + 1)
  return concat(pieces), count
end
