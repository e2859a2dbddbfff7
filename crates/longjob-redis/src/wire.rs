//! An event's form in Redis: its JSON without `seq` nor `jobId`, from the comma after them on
//! (`,"at":…,"type":…}`), since the list position or the message gives the seq and the key or
//! channel gives the job. Leaving out the job id takes 48 bytes off every event (about a fifth
//! of a progress event), which Redis copies, hashes into Lua and sends to every subscriber.
//!
//! Events written before that keep their `jobId` (`,"jobId":"…","at":…`): both forms read.

use longjob_core::{BackendError, BackendResult, JobEvent, JobId, rfc3339};

use crate::BACKEND;

/// The start of a body written with its job id.
const WITH_JOB_ID: &str = ",\"jobId\":";

/// `event` as Redis keeps it: its JSON from the comma after its job id on, which is `at`, then
/// its payload's fields (`JobEvent` flattens its payload after `at`).
///
/// Written from the payload's own JSON rather than cut out of the whole event's: the event
/// serializes through serde's flattening (a map, field by field) and writes the job id only
/// for it to be cut off, which cost as much as the rest of the body.
pub(crate) fn body(event: &JobEvent) -> BackendResult<String> {
    let payload = event
        .payload
        .to_json()
        .map_err(|e| BackendError::corrupt(BACKEND, e))?;
    // An object with its `type` at least: `{"type":…}`.
    let fields = payload
        .strip_prefix('{')
        .filter(|fields| fields.starts_with('"'))
        .ok_or_else(|| {
            BackendError::corrupt(
                BACKEND,
                "an event's payload does not serialize as an object",
            )
        })?;
    let mut body = String::with_capacity(fields.len() + 40);
    body.push_str(",\"at\":\"");
    // RFC 3339 as chrono writes it: ASCII with nothing to escape in a JSON string.
    rfc3339::push(&event.at, &mut body);
    body.push_str("\",");
    body.push_str(fields);
    Ok(body)
}

/// The event numbered `seq` of `job` from its `body`, in either form.
pub(crate) fn decode(job: JobId, seq: u64, body: &str) -> Result<JobEvent, String> {
    let json = if body.starts_with(WITH_JOB_ID) {
        format!("{{\"seq\":{seq}{body}")
    } else {
        format!("{{\"seq\":{seq},\"jobId\":\"{job}\"{body}")
    };
    serde_json::from_str(&json).map_err(|e| format!("event {seq}: {e}"))
}

/// An event of `job` kept or published whole but for its job id: `{"seq":<n>` then a body.
pub(crate) fn decode_numbered(job: JobId, numbered: &str) -> Result<JobEvent, String> {
    let rest = numbered
        .strip_prefix("{\"seq\":")
        .ok_or("an event without its seq first")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let seq = rest[..digits]
        .parse()
        .map_err(|_| "an event without its seq first")?;
    decode(job, seq, &rest[digits..])
}

#[cfg(test)]
mod tests {
    use longjob_core::{ErrorKind, EventPayload, JobError, JobEvent, JobId, JobState, Progress};

    use super::{body, decode, decode_numbered};

    fn event(job: JobId, seq: u64) -> JobEvent {
        JobEvent {
            seq,
            job_id: job,
            at: "2026-12-04T18:27:25.311933543Z".parse().expect("a time"),
            payload: EventPayload::Progress {
                progress: Progress {
                    current: 1,
                    total: 2,
                    ..Progress::default()
                },
            },
        }
    }

    #[test]
    fn a_body_leaves_out_the_seq_and_the_job_id_and_reads_back() {
        let job = JobId::new();
        let written = body(&event(job, 0)).expect("serializes");
        assert!(written.starts_with(",\"at\":"), "{written}");
        assert!(!written.contains(&job.to_string()), "{written}");
        assert_eq!(decode(job, 7, &written), Ok(event(job, 7)));
        let numbered = format!("{{\"seq\":7{written}");
        assert_eq!(decode_numbered(job, &numbered), Ok(event(job, 7)));
    }

    /// The body as the event's whole JSON gives it, from the comma after its job id on.
    fn cut_from_whole(event: &JobEvent) -> String {
        let json = serde_json::to_string(event).expect("serializes");
        let head = format!("{{\"seq\":{},\"jobId\":\"{}\"", event.seq, event.job_id);
        json.strip_prefix(head.as_str())
            .expect("seq and job id first")
            .to_string()
    }

    #[test]
    fn a_body_is_the_events_json_after_its_job_id() {
        let job = JobId::new();
        let error = JobError::new(ErrorKind::Validation, "no \"file\" 7\n");
        let payloads = [
            EventPayload::Status {
                status: JobState::Retrying,
                attempt: 2,
                error: Some(error.clone()),
                next_run_at: Some("2026-12-04T18:27:26.5Z".parse().expect("a time")),
                progress: Some(Progress::default()),
            },
            EventPayload::Status {
                status: JobState::Queued,
                attempt: 0,
                error: None,
                next_run_at: None,
                progress: None,
            },
            event(job, 0).payload,
            EventPayload::Completed {
                download_url: Some("http://x/y?a=1&b=\u{e9}".into()),
                expires_at: Some("2026-12-05T00:00:00Z".parse().expect("a time")),
                size: Some(12),
            },
            EventPayload::Completed {
                download_url: None,
                expires_at: None,
                size: None,
            },
            EventPayload::Failed { error, attempt: 3 },
            EventPayload::Cancelled {},
        ];
        for at in ["2026-12-04T18:27:25Z", "2026-12-04T18:27:25.311933543Z"] {
            for payload in &payloads {
                let event = JobEvent {
                    seq: 0,
                    job_id: job,
                    at: at.parse().expect("a time"),
                    payload: payload.clone(),
                };
                assert_eq!(body(&event).expect("serializes"), cut_from_whole(&event));
            }
        }
    }

    #[test]
    fn a_body_written_with_its_job_id_still_reads() {
        let job = JobId::new();
        let old = event(job, 3);
        let json = serde_json::to_string(&old).expect("serializes");
        let with_id = json.strip_prefix("{\"seq\":3").expect("seq first");
        assert!(with_id.starts_with(",\"jobId\":"));
        assert_eq!(decode(job, 3, with_id), Ok(old.clone()));
        assert_eq!(decode_numbered(job, &json), Ok(old));
    }

    #[test]
    fn what_is_not_an_event_is_an_error() {
        let job = JobId::new();
        for bad in ["", "{", ",\"at\":1}", ",\"jobId\":\"x\"}"] {
            assert!(decode(job, 1, bad).is_err(), "{bad:?}");
        }
        for bad in ["", "{", "{\"seq\":", "{\"seq\":x,\"at\":1}", "[1]"] {
            assert!(decode_numbered(job, bad).is_err(), "{bad:?}");
        }
    }
}
