//! [`ScriptCall`]: one `EVALSHA` with its keys and arguments written straight into the
//! command that is sent.

use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

/// A call of one of the backend's Lua scripts.
///
/// redis's `ScriptInvocation` keeps each argument in a buffer of its own and copies them all
/// into a new command on every call: with a job's JSON among a write's arguments, that was
/// about 26 allocations a job, and one more copy of every byte sent. Here every key and
/// argument goes once into the command's single buffer (integers written as decimals there,
/// with no string of their own).
pub(crate) struct ScriptCall {
    script: &'static Script,
    cmd: Cmd,
}

impl ScriptCall {
    /// A call of `script` with `keys` (its `KEYS`); its `ARGV` follow with [`arg`](Self::arg).
    pub(crate) fn new(script: &'static Script, keys: &[&str]) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
        Self { script, cmd }
    }

    /// Appends `arg` (or, for a slice or vector, each of its items) to `ARGV`.
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Runs the script, loading it first when Redis does not know it (after a restart or a
    /// `SCRIPT FLUSH`).
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            answer => answer,
        }
    }
}
