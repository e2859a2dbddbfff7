//! Mapping of sqlx errors into core's classified [`BackendError`].

use std::time::Duration;

use longjob_core::{BackendError, JobId};

/// The backend name in errors.
pub(crate) const BACKEND: &str = "postgres";

/// Maps an sqlx error into a [`BackendError`] of the right class: connection failures are
/// `Unavailable`, pool and statement timeouts are `Timeout` (both transient).
pub(crate) fn map_err(e: sqlx::Error, timeouts: &Timeouts) -> BackendError {
    use sqlx::Error as E;
    match e {
        E::PoolTimedOut => BackendError::Timeout {
            backend: BACKEND,
            after: timeouts.acquire,
        },
        E::Io(_) | E::Tls(_) | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => {
            BackendError::unavailable(BACKEND, e)
        }
        E::Database(ref db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match classify_sqlstate(&code) {
                Class::Timeout => BackendError::Timeout {
                    backend: BACKEND,
                    after: timeouts.statement.unwrap_or(Duration::ZERO),
                },
                Class::Unavailable => BackendError::unavailable(BACKEND, e),
                Class::Unauthorized => BackendError::Unauthorized {
                    backend: BACKEND,
                    message: db.message().to_owned(),
                },
                Class::Other => BackendError::corrupt(
                    BACKEND,
                    format_args!("unexpected database error {code}: {}", db.message()),
                ),
            }
        }
        E::Configuration(_) => BackendError::InvalidArgument(e.to_string()),
        other => BackendError::corrupt(BACKEND, other),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    Timeout,
    Unavailable,
    Unauthorized,
    Other,
}

/// Classifies a SQLSTATE.
fn classify_sqlstate(code: &str) -> Class {
    match code {
        // query_canceled: statement_timeout (or a cancel request).
        "57014" => Class::Timeout,
        // admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped,
        // serialization_failure, deadlock_detected, lock_not_available, read-only transaction
        // (a failover in progress).
        "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "40001" | "40P01" | "55P03" | "25006" => {
            Class::Unavailable
        }
        // insufficient_privilege.
        "42501" => Class::Unauthorized,
        // Connection exceptions (08), insufficient resources (53: too many connections, disk
        // full), system errors (58).
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            Class::Unavailable
        }
        // invalid authorization.
        c if c.starts_with("28") => Class::Unauthorized,
        _ => Class::Other,
    }
}

/// If `e` is a unique violation of a job's primary key, the job id named in its detail.
pub(crate) fn duplicate_job_id(e: &sqlx::Error) -> Option<Option<JobId>> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    if db.code().as_deref() != Some("23505") || db.constraint() != Some("download_jobs_pkey") {
        return None;
    }
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.detail())
        .unwrap_or_default();
    // "Key (id)=(0191…) already exists."
    let id = detail
        .split_once("=(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(id, _)| id.parse().ok());
    Some(id)
}

/// The timeouts an error may report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) acquire: Duration,
    pub(crate) statement: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_transient_sqlstates() {
        assert_eq!(classify_sqlstate("57014"), Class::Timeout);
        for code in ["57P01", "08006", "08001", "53300", "40001", "58000"] {
            assert_eq!(classify_sqlstate(code), Class::Unavailable, "{code}");
        }
        assert_eq!(classify_sqlstate("28P01"), Class::Unauthorized);
        assert_eq!(classify_sqlstate("42P01"), Class::Other);
    }

    #[test]
    fn pool_timeout_is_a_timeout() {
        let t = Timeouts {
            acquire: Duration::from_secs(3),
            statement: None,
        };
        let e = map_err(sqlx::Error::PoolTimedOut, &t);
        assert!(
            matches!(e, BackendError::Timeout { after, .. } if after == Duration::from_secs(3))
        );
        assert!(map_err(sqlx::Error::PoolClosed, &t).is_transient());
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(map_err(io, &t), BackendError::Unavailable { .. }));
    }
}
