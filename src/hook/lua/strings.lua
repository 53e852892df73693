-- string.find, match, gmatch and gsub for hooks: the Lua half of src/hook/lua/strings.rs.
--
-- A call whose worst case is small goes to Lua's own C function, which is quick to call; any
-- other to the port in Rust, which checks the budget as it goes. The port's functions answer
-- `false, message` where C would raise an error, and the error is raised here as C raises it:
-- a string, with the position of the script's line that called the library (level 2 from a
-- function the wrapper tail-calls, level 3 from one it calls and returns from). Everything
-- used is kept in a local, so a script that replaces a global cannot change it.
local find, gsub, step, C_MAX = ...
-- Loaded before the prelude, so this `pcall` is Lua's own: an error it catches is raised again
-- at once, never swallowed.
local pcall, error, type, tostring, tonumber, toint =
  pcall, error, type, tostring, tonumber, math.tointeger
local select, getmetatable = select, getmetatable
local sub, byte, concat = string.sub, string.byte, table.concat
local c_find, c_match, c_gmatch, c_gsub = string.find, string.match, string.gmatch, string.gsub

-- A pattern's kind: -1 when it has no special byte (a plain string), else how many of its
-- items may try every length of the subject (`*`, `+`, `-`, `?`, `%b`, `%1`..`%9`; counted by
-- byte, so an escaped or bracketed one counts too, which only overestimates). Asked of C, on
-- at most 256 bytes.
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]"
local function kind(p)
  if #p > 256 then return 1e9 end
  if not c_find(p, SPECIALS) then return -1 end
  return select(2, c_gsub(p, "[%*%+%-%?]", "")) + select(2, c_gsub(p, "%%[b1-9]", ""))
end

-- The worst case, in steps, of a call of kind `how` with pattern `p` on n bytes. "plain" is
-- `find`'s plain search (memchr, then memcmp: at most n * m compares), as is "find" for a
-- pattern without a special byte; "match" (and `gsub`) and "gmatch" run the matcher, which
-- tries at most n + 1 starts (one when `^` anchors, which it does not in `gmatch`), and from
-- each, every counted item may try every length, each try walking the pattern and subject.
local function cost(how, p, k, n)
  local m = #p
  if how == "plain" or (how == "find" and k < 0) then return n * m end
  if k < 0 then k = 0 end
  local starts = (how ~= "gmatch" and byte(p, 1) == 94) and 1 or n + 1
  return starts * (n + 1) ^ k * (k + 1) * (n * m + m * m + 1)
end

-- For each kind of call, the longest subject C may take with each pattern seen (its worst
-- case within C_MAX steps; -1 for none), worked out once and kept for up to 1024 patterns of
-- up to 256 bytes.
local plain_at, find_at, match_at, gmatch_at, known = {}, {}, {}, {}, 0
local function limit(how, p)
  if type(p) ~= "string" then return -1 end
  local k = kind(p)
  local lo, hi = -1, C_MAX
  while lo < hi do
    local mid = (lo + hi + 1) // 2
    if cost(how, p, k, mid) <= C_MAX then lo = mid else hi = mid - 1 end
  end
  if #p > 256 then return lo end
  if known >= 1024 then
    plain_at, find_at, match_at, gmatch_at, known = {}, {}, {}, {}, 0
  end
  local at = how == "plain" and plain_at or how == "find" and find_at
    or how == "match" and match_at or gmatch_at
  at[p], known = lo, known + 1
  return lo
end

local function check(ok, ...)
  if ok then return ... end
  error((...), 2)
end

-- C runs under pcall, where it names no line in its errors; its own errors (a malformed
-- pattern, an unfinished capture) are raised again from the script's line, as a direct call
-- has them. Arguments C would refuse never reach it: such calls go to the port, whose messages
-- name them. An error in the script's replacement function is marked by `relay` and passes on
-- as it is.
local relayed = false
local function relay(ok, ...)
  if ok then return ... end
  relayed = true
  error((...), 0)
end
local function c_check(ok, ...)
  if ok then return ... end
  if relayed then
    relayed = false
    error((...), 0)
  end
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

string.find = function(s, p, init, plain)
  local max
  if plain then max = plain_at[p] or limit("plain", p) else max = find_at[p] or limit("find", p) end
  if type(s) == "string" and #s <= max and (init == nil or toint(init)) then
    return c_check(pcall(c_find, s, p, init, plain))
  end
  return check(find(true, s, p, init, plain))
end
string.match = function(s, p, init)
  if type(s) == "string" and #s <= (match_at[p] or limit("match", p))
      and (init == nil or toint(init)) then
    return c_check(pcall(c_match, s, p, init))
  end
  return check(find(false, s, p, init))
end

string.gmatch = function(s, p, init)
  if type(s) == "string" and #s <= (gmatch_at[p] or limit("gmatch", p))
      and (init == nil or toint(init)) then
    return c_check(pcall(c_gmatch, s, p, init))
  end
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
  return function() return on(step(s, p, at, last, false, false)) end
end

-- On top of the matching, C walks a replacement string once per match, whatever the match
-- adds (an empty one adds nothing, so the memory limit would not stop it): at most n + 1
-- walks. A table with a metatable may run code C cannot tell from its own errors: the port.
string.gsub = function(s, p, repl, n)
  local tr = type(repl)
  if tr == "number" then repl, tr = tostring(repl), "string" end
  if type(s) == "string" and #s <= (match_at[p] or limit("match", p))
      and (n == nil or toint(n)) then
    if tr == "string" and (#s + 1) * (#repl + 1) <= C_MAX
        or tr == "table" and getmetatable(repl) == nil then
      return c_check(pcall(c_gsub, s, p, repl, n))
    elseif tr == "function" then
      local f = repl
      return c_check(pcall(c_gsub, s, p, function(...) return relay(pcall(f, ...)) end, n))
    end
  end
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
  while count < max and on(step(s, p, at, last, true, tr == "table")) and not anchored do end
  pieces[k + 1] = sub(s, at + 1)
  return concat(pieces), count
end
