//! An event's form in Redis: its JSON without `seq` nor `jobId`, from the comma after them on
//! (`,"at":…,"type":…}`), since the list position or the message gives the seq and the key or
//! channel gives the job. Leaving out the job id takes 48 bytes off every event (about a fifth
//! of a progress event), which Redis copies, hashes into Lua and sends to every subscriber.
//!
//! Events written before that keep their `jobId` (`,"jobId":"…","at":…`): both forms read.

use longjob_core::{BackendError, BackendResult, JobEvent, JobId};

use crate::BACKEND;

/// Every event serializes with these fields first, `seq` 0 until the bus numbers it.
const SEQ_ZERO: &str = "{\"seq\":0,\"jobId\":\"";

/// The start of a body written with its job id.
const WITH_JOB_ID: &str = ",\"jobId\":";

/// `event` as Redis keeps it: its JSON from the comma after its job id on.
pub(crate) fn body(event: &JobEvent) -> BackendResult<String> {
    let mut json = serde_json::to_string(event).map_err(|e| BackendError::corrupt(BACKEND, e))?;
    let head = format!("{SEQ_ZERO}{}\"", event.job_id);
    // `{"seq":0,"jobId":"<id>"`, then the comma the body starts with.
    let starts_as_expected = json
        .strip_prefix(head.as_str())
        .is_some_and(|b| b.starts_with(','));
    if !starts_as_expected {
        return Err(BackendError::corrupt(
            BACKEND,
            "an event does not serialize with seq 0 and its job id first",
        ));
    }
    json.drain(..head.len());
    Ok(json)
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
    use longjob_core::{EventPayload, JobEvent, JobId, Progress};

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
