//! PostgreSQL transactions per job: the database's `pg_stat_database` commit and rollback counts
//! before and after a run, read with `psql` (the client that comes with the server's packages).
//!
//! The counts are database-wide (anything else using the same database during the run counts
//! too) and PostgreSQL publishes a backend's counts when its transaction ends at most once a
//! second, or when it disconnects; the harness reads the second count after the measured
//! processes have closed their connections, and waits a second first.

use std::process::{Command, Stdio};

const QUERY: &str = "select xact_commit + xact_rollback from pg_stat_database \
                     where datname = current_database()";

/// The database's committed plus rolled back transactions so far (this query's own included).
pub(crate) fn transactions(database_url: &str) -> Result<u64, String> {
    let output = Command::new("psql")
        .args(["-X", "-A", "-t", "-c", QUERY, database_url])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "psql: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

fn parse(out: &str) -> Result<u64, String> {
    out.trim()
        .parse::<u64>()
        .map_err(|e| format!("psql printed {:?}: {e}", out.trim()))
}

/// Transactions per job between two readings (the reading's own transaction left out), two
/// decimals (batching systems run well under one transaction per job).
pub(crate) fn per_job(before: u64, after: u64, jobs: usize) -> serde_json::Value {
    let delta = after.saturating_sub(before).saturating_sub(1);
    serde_json::json!(((delta as f64 / jobs.max(1) as f64) * 100.0).round() / 100.0)
}

/// The second reading: waits a second for the stats of the measured (now disconnected)
/// processes to be published, then reads the count.
pub(crate) fn after(database_url: &str) -> Result<u64, String> {
    std::thread::sleep(std::time::Duration::from_secs(1));
    transactions(database_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_divides() {
        assert_eq!(parse(" 1234\n").unwrap(), 1234);
        assert!(parse("").is_err());
        assert_eq!(per_job(100, 301, 100), serde_json::json!(2.0));
        assert_eq!(per_job(0, 4, 100), serde_json::json!(0.03));
        assert_eq!(per_job(100, 100, 100), serde_json::json!(0.0));
    }
}
