//! One sandboxed Lua state: the prelude every script gets, the budgets a call runs under, and
//! how a state is built from a script.

use std::cell::Cell;
use std::time::Instant;

use mlua::LuaSerdeExt as _;
use mlua::{AnyUserData, Function, HookTriggers, Lua, LuaOptions, StdLib, Table, VmState};

use super::request::LuaRequest;
use super::{Limits, LuaHook};

/// Helpers every script gets before its own code runs. Each keeps the functions it calls in
/// locals: a script that replaced the global `error` would otherwise turn the guards off.
const PRELUDE: &str = include_str!("prelude.lua");

/// How often the budget is checked, in VM instructions: the C library calls that fit in this
/// many instructions run unchecked. (Once the budget is spent, the check runs on every
/// instruction: see [`budget_hook`].)
const CHECK_EVERY: u32 = 100;

pub(super) struct Budget {
    instructions_left: Cell<u64>,
    deadline: Cell<Instant>,
    /// The hook fires on every instruction (the budget ran out), until the next call's arm.
    tight: Cell<bool>,
}

impl Budget {
    /// A budget of `timeout` from now, for a state without the instruction count.
    #[cfg(test)]
    pub(super) fn lasting(timeout: std::time::Duration) -> Budget {
        Budget {
            instructions_left: Cell::new(u64::MAX),
            deadline: Cell::new(Instant::now() + timeout),
            tight: Cell::new(false),
        }
    }

    pub(super) fn exhausted(&self) -> bool {
        self.instructions_left.get() == 0 || Instant::now() > self.deadline.get()
    }

    /// A fresh budget for one call, or for a script's top-level code.
    pub(super) fn arm(&self, limits: &Limits) {
        self.instructions_left
            .set(limits.max_instructions.max(u64::from(CHECK_EVERY)));
        self.deadline.set(Instant::now() + limits.timeout);
    }
}

pub(super) struct State {
    pub(super) lua: Lua,
    pub(super) on_request: Function,
    pub(super) on_error: Option<Function>,
    /// What `forward()` returns.
    pub(super) forward: Table,
    /// The `req` every call gets, holding the request being handled (an idle one in between).
    /// One object for the state's life, not one per call: a userdata carries a finalizer, and
    /// Lua's collector runs finalizers a few at a time. At tens of thousands of calls a second
    /// it fell behind, and the heap grew until every call failed on the memory limit (after
    /// about 150k calls the growth started; 64 MiB were gone after ~1.7M).
    pub(super) req: AnyUserData,
    /// Bytes the state held once its script's top-level code had run (after a collection):
    /// what a new state would start from.
    pub(super) resident: usize,
}

/// The VM's check of the budget, every [`CHECK_EVERY`] instructions. Once the budget is spent
/// it fires on every instruction: Lua runs the closers of to-be-closed variables in the
/// callers' frames as the budget's error unwinds, and each then fails at its first
/// instruction, not after a window of them (with whatever C calls fit in it). (The closers of
/// the frame the budget ran out in run inside this hook, where Lua turns hooks off: mlua
/// resets the stack there to hand the error over. No check reaches them; SECURITY says so.)
fn budget_hook(lua: &Lua, _: &mlua::debug::Debug<'_>) -> mlua::Result<VmState> {
    let budget = lua
        .app_data_ref::<Budget>()
        .ok_or_else(|| mlua::Error::runtime("no budget"))?;
    let left = budget
        .instructions_left
        .get()
        .saturating_sub(u64::from(CHECK_EVERY));
    budget.instructions_left.set(left);
    let why = if left == 0 {
        "instruction budget exceeded"
    } else if Instant::now() > budget.deadline.get() {
        "time budget exceeded"
    } else {
        return Ok(VmState::Continue);
    };
    if !budget.tight.replace(true) {
        drop(budget);
        // A hook that cannot be set (no memory left) leaves the window as it was.
        let _ = lua.set_hook(HookTriggers::new().every_nth_instruction(1), budget_hook);
    }
    Err(mlua::Error::runtime(why))
}

/// Gives the state a fresh budget for a call (or top-level code), with the budget's check back
/// at its usual interval if the last call spent its budget.
pub(super) fn arm(lua: &Lua, limits: &Limits) -> mlua::Result<()> {
    let budget = lua
        .app_data_ref::<Budget>()
        .ok_or_else(|| mlua::Error::runtime("no budget"))?;
    budget.arm(limits);
    if budget.tight.get() {
        drop(budget);
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            budget_hook,
        )?;
        if let Some(budget) = lua.app_data_ref::<Budget>() {
            budget.tight.set(false);
        }
    }
    Ok(())
}

/// Whether the call under way (or the last one) in `lua` ran out of its instruction or time
/// budget.
pub(super) fn spent(lua: &Lua) -> bool {
    lua.app_data_ref::<Budget>().is_none_or(|b| b.exhausted())
}

/// Fails once the call's instruction or time budget is spent: for Rust work driven by a
/// script, which the VM's checks between instructions do not see.
pub(super) fn within_budget(lua: &Lua) -> mlua::Result<()> {
    if spent(lua) {
        return Err(mlua::Error::runtime("the hook's budget is spent"));
    }
    Ok(())
}

impl LuaHook {
    pub(super) fn new_state(&self) -> mlua::Result<State> {
        let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default())?;
        let globals = lua.globals();
        // The base library can read files and load bytecode; scripts get neither.
        for name in ["dofile", "loadfile", "load", "require", "collectgarbage"] {
            globals.set(name, mlua::Nil)?;
        }
        globals.set(
            "print",
            lua.create_function(|lua, values: mlua::Variadic<mlua::Value>| {
                // Called from a C loop (as a metamethod), it would run free of the VM's checks.
                within_budget(lua)?;
                tracing::info!(target: "kafboy::hook::lua", "{}", print_line(&values));
                Ok(())
            })?,
        )?;
        // JSON null inside tables `req:get` returns (a nil would drop the key), and arrays
        // that stay arrays when empty: what `req:set` needs to write `null` and `[]`.
        globals.set("null", mlua::Value::NULL)?;
        globals.set(
            "array",
            lua.create_function(|lua, items: mlua::Variadic<mlua::Value>| {
                let table = lua.create_table_with_capacity(items.len(), 0)?;
                for (i, item) in items.into_iter().enumerate() {
                    table.raw_set(i + 1, item)?;
                }
                table.set_metatable(Some(lua.array_metatable()))?;
                Ok(table)
            })?,
        )?;
        lua.set_memory_limit(self.limits.max_memory)?;
        lua.set_app_data(Budget {
            instructions_left: Cell::new(u64::MAX),
            deadline: Cell::new(Instant::now()),
            tight: Cell::new(false),
        });
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            budget_hook,
        )?;
        globals.set(
            "__kafboy_exhausted",
            lua.create_function(|lua, ()| Ok(spent(lua)))?,
        )?;
        // The prelude and the script's top-level code run under a call's budgets: a loop there
        // would otherwise hold the first request of every worker thread (a state is made on a
        // thread's first call) for ever.
        arm(&lua, &self.limits)?;
        // Before the prelude, which wraps `pcall`: the library keeps Lua's own.
        super::strings::install(&lua, self.limits.max_memory, super::strings::C_MAX)?;
        lua.load(PRELUDE).set_name("=prelude").exec()?;
        let forward: Table = globals.get("__kafboy_forward")?;
        globals.set("__kafboy_forward", mlua::Value::Nil)?;
        arm(&lua, &self.limits)?;
        lua.load(&*self.source)
            .set_name(format!("@{}", self.path.display()))
            .exec()?;
        let on_request: Function = lua
            .globals()
            .get::<Option<Function>>("on_request")?
            .ok_or_else(|| {
                mlua::Error::runtime("the script defines no function on_request(req)")
            })?;
        let on_error = lua.globals().get::<Option<Function>>("on_error")?;
        let req = lua.create_userdata(LuaRequest::idle())?;
        lua.gc_collect()?;
        let resident = lua.used_memory();
        Ok(State {
            lua,
            on_request,
            on_error,
            forward,
            req,
            resident,
        })
    }
}

/// Most bytes of one `print` line: the copy is made outside the Lua heap and its limit.
const PRINT_MAX: usize = 4096;

/// What `print` logs of `values`: strings, numbers, booleans and nil as Lua shows them, other
/// values by their type. No `__tostring` runs: a metamethod could swallow the budget's error
/// (mlua runs it in a protected call of its own), or loop where no budget sees it.
pub(super) fn print_line(values: &[mlua::Value]) -> String {
    let mut line = String::new();
    for (i, v) in values.iter().enumerate() {
        if line.len() >= PRINT_MAX {
            break;
        }
        if i > 0 {
            line.push('\t');
        }
        let room = PRINT_MAX - line.len();
        match v {
            mlua::Value::String(s) => {
                let bytes = s.as_bytes();
                line.push_str(&String::from_utf8_lossy(&bytes[..bytes.len().min(room)]));
            }
            mlua::Value::Nil => line.push_str("nil"),
            mlua::Value::Boolean(b) => line.push_str(if *b { "true" } else { "false" }),
            mlua::Value::Integer(n) => line.push_str(&n.to_string()),
            mlua::Value::Number(n) => {
                line.push_str(&mlua::Value::Number(*n).to_string().unwrap_or_default())
            }
            other => line.push_str(other.type_name()),
        }
    }
    if line.len() > PRINT_MAX {
        let mut end = PRINT_MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}
