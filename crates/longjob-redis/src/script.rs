//! [`ScriptCall`]: one `EVALSHA` with its keys and arguments written straight into the
//! command that is sent.

use longjob_core::JobId;
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
        Self::with_capacity(script, keys, 0, 0)
    }

    /// A call with room for `args` arguments of about `bytes` bytes in all: a batch's
    /// command is tens of kilobytes, and a buffer that grows copies itself each time it does.
    pub(crate) fn with_capacity(
        script: &'static Script,
        keys: &[&str],
        args: usize,
        bytes: usize,
    ) -> Self {
        let keys_len: usize = keys.iter().map(|k| k.len()).sum();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args, 64 + keys_len + bytes);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(keys.len())
            .arg(keys);
        Self { script, cmd }
    }

    /// Appends a job id, hyphenated, to `ARGV` (written from the stack, see
    /// [`JobId::with_text`]).
    pub(crate) fn id(&mut self, id: JobId) -> &mut Self {
        id.with_text(|id| self.cmd.arg(id));
        self
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
