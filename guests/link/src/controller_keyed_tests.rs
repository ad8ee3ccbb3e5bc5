//! Tests of keyed (idempotent) job submission: `SubmitKeyedJob`.

use super::*;

fn keyed(key: &str, pages: u32, seed: u64) -> HostRequest {
    HostRequest::SubmitKeyedJob {
        key: key.to_string(),
        pages,
        seed,
        width: 32,
        height: 16,
    }
}

#[test]
fn a_key_seen_before_is_answered_with_its_job_and_printed_once() {
    let mut r = Rig::new();
    r.connect();
    r.host(1, keyed("job-a", 3, 5));
    // Again while it prints, from another client (a relay that reconnected).
    r.host(2, keyed("job-a", 3, 5));
    r.host(2, keyed("job-b", 1, 6));
    assert_eq!(
        r.take_replies(),
        vec![
            (
                1,
                HostReply::KeyedJobAccepted {
                    id: 1,
                    duplicate: false
                }
            ),
            (
                2,
                HostReply::KeyedJobAccepted {
                    id: 1,
                    duplicate: true
                }
            ),
            (
                2,
                HostReply::KeyedJobAccepted {
                    id: 2,
                    duplicate: false
                }
            ),
        ]
    );
    r.run_engine(None);
    // And again once it is done: same job, nothing printed.
    r.host(3, keyed("job-a", 3, 5));
    assert_eq!(
        r.take_replies(),
        vec![(
            3,
            HostReply::KeyedJobAccepted {
                id: 1,
                duplicate: true
            }
        )]
    );
    r.run_engine(None);
    assert_eq!(r.e.pages_printed(), 4);
    let j = r.c.job(1).unwrap();
    assert_eq!(j.state, JobState::Done);
    assert_eq!(
        j.checksums,
        (0..3)
            .map(|p| expected_page_checksum(5, p, 32, 16))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_known_key_with_other_parameters_or_a_bad_key_is_422() {
    let mut r = Rig::new();
    r.host(1, keyed("job-a", 3, 5));
    r.host(1, keyed("job-a", 4, 5));
    r.host(1, keyed("", 1, 1));
    r.host(1, keyed(&"k".repeat(MAX_JOB_KEY_LEN + 1), 1, 1));
    r.host(1, keyed("tab\there", 1, 1));
    r.host(1, keyed(&"k".repeat(MAX_JOB_KEY_LEN), 0, 1));
    let replies = r.take_replies();
    assert_eq!(replies.len(), 6);
    for (_, reply) in &replies[1..] {
        assert!(
            matches!(reply, HostReply::Error { code, .. } if *code == error_code::INVALID_JOB),
            "{reply:?}"
        );
    }
    // The refused ones left nothing behind: one job only.
    assert_eq!(r.c.active_jobs(), 1);
}

#[test]
fn a_forgotten_job_forgets_its_key() {
    let mut r = Rig::new();
    r.connect();
    r.host(1, keyed("first", 1, 1));
    r.run_engine(None);
    for i in 0..MAX_FINISHED_JOBS {
        r.host(1, submit(1, i as u64));
        r.run_engine(None);
    }
    assert!(r.c.job(1).is_none(), "job 1 should be forgotten");
    r.take_replies();
    r.host(1, keyed("first", 1, 1));
    let replies = r.take_replies();
    assert!(
        matches!(
            replies[..],
            [(
                1,
                HostReply::KeyedJobAccepted {
                    duplicate: false,
                    ..
                }
            )]
        ),
        "{replies:?}"
    );
}
