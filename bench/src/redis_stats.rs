//! Redis commands per job: the server's `INFO commandstats` call counts before and after a run.
//!
//! A few lines of RESP over a plain TCP socket, so the harness needs no Redis client. The counts
//! are server-wide: anything else using the same Redis during the run is counted too, so measure
//! on a quiet server. Commands that Lua scripts call count as commands (that is how Redis counts
//! them), besides the `EVALSHA` that ran the script.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Host, port and credentials of a `redis://[user[:password]@]host[:port][/db]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

pub(crate) fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("{url}: only redis:// URLs are measured"))?;
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((auth, hostport)) => (Some(auth), hostport),
        None => (None, rest),
    };
    let (user, password) = match auth {
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) => (
                (!user.is_empty()).then(|| user.to_string()),
                Some(password.to_string()),
            ),
            None => (Some(auth.to_string()), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|e| format!("{url}: port {port}: {e}"))?,
        ),
        None => (hostport, 6379),
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok(Target {
        host: host.trim_start_matches('[').trim_end_matches(']').into(),
        port,
        user,
        password,
    })
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Reads one reply: a simple string, an error, an integer or a bulk string.
fn reply(reader: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'+') | Some(b':') => Ok(line[1..].to_string()),
        Some(b'-') => Err(line[1..].to_string()),
        Some(b'$') => {
            let len: usize = line[1..]
                .parse()
                .map_err(|_| format!("bad bulk length {line:?}"))?;
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            body.truncate(len);
            String::from_utf8(body).map_err(|e| e.to_string())
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

/// The sum of `calls=` over `cmdstat_*` lines, leaving out `INFO` itself.
pub(crate) fn sum_calls(info: &str) -> u64 {
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter(|line| !line.starts_with("info:"))
        .filter_map(|line| {
            let fields = line.split_once(':')?.1;
            fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The server's total command count so far.
pub(crate) fn command_calls(url: &str) -> Result<u64, String> {
    let target = parse_url(url)?;
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .map_err(|e| format!("{}:{}: {e}", target.host, target.port))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    if let Some(password) = &target.password {
        let auth = match &target.user {
            Some(user) => command(&["AUTH", user, password]),
            None => command(&["AUTH", password]),
        };
        writer.write_all(&auth).map_err(|e| e.to_string())?;
        reply(&mut reader).map_err(|e| format!("AUTH: {e}"))?;
    }
    writer
        .write_all(&command(&["INFO", "commandstats"]))
        .map_err(|e| e.to_string())?;
    let info = reply(&mut reader).map_err(|e| format!("INFO: {e}"))?;
    Ok(sum_calls(&info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        let t = parse_url("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 6380));
        assert_eq!((t.user, t.password), (None, None));
        let t = parse_url("redis://:secret@localhost").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 6379));
        assert_eq!((t.user, t.password.as_deref()), (None, Some("secret")));
        let t = parse_url("redis://me:pw@[::1]:7000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7000));
        assert_eq!(t.user.as_deref(), Some("me"));
        assert!(parse_url("rediss://h").is_err());
        assert!(parse_url("redis://h:x").is_err());
    }

    #[test]
    fn sums_calls_without_info() {
        let info = "# Commandstats\r\ncmdstat_get:calls=3,usec=1,usec_per_call=0.3\r\n\
                    cmdstat_info:calls=100,usec=9\r\ncmdstat_evalsha:calls=4,usec=2\r\n";
        assert_eq!(sum_calls(info), 7);
    }

    #[test]
    fn reads_bulk_and_error_replies() {
        let mut ok = BufReader::new(&b"$5\r\nhello\r\n"[..]);
        assert_eq!(reply(&mut ok).unwrap(), "hello");
        let mut err = BufReader::new(&b"-NOAUTH needed\r\n"[..]);
        assert_eq!(reply(&mut err).unwrap_err(), "NOAUTH needed");
    }
}
