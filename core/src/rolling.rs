//! Rolling documents: a logical document kept as a sequence of bucket documents, one per
//! period, so that its history (and each write's cost) stays bounded however long it lives.
//!
//! Automerge keeps every value ever written: a sensor reading overwritten every second makes
//! one document grow by 86,400 changes a day, and every write and every apply slower. A
//! [`Rolling`] policy maps a logical id under its prefix, `sensors/temp`, to the bucket of the
//! writer's clock, `sensors/temp@3600s.493872` (the period in seconds, then the Unix time
//! divided by it). Nothing is coordinated: every replica with the same policy computes the
//! same ids, and each bucket is an ordinary document (signed, synced, granted by prefix).
//!
//! - **Writes** go to the newest bucket the replica knows, or the one of its clock if that is
//!   newer: a replica never writes into a bucket older than one it has seen. Buckets more than
//!   one period ahead of the replica's clock are ignored (a writer whose clock is far ahead
//!   cannot stop the others from rolling).
//! - **A new bucket starts from the previous one**: the first write into it also puts every
//!   top-level value of the newest older bucket held (counters as counters, text as text).
//!   Two replicas that start the same bucket at once both copy; Automerge resolves the copies
//!   like any concurrent puts, so replicas converge.
//! - **Reads** of the logical id show the newest bucket held.
//! - **Retention**: a replica keeps the `keep` newest buckets of each logical document and
//!   forgets older ones locally (their changes stay on the hub), once every change it wrote
//!   there is acknowledged: nothing unacknowledged is ever dropped.
//! - **Followers** subscribe to the bucket of their clock and the next one, and move on as
//!   time passes ([`crate::replica::Replica::roll`]).
//!
//! What this gives up: a write into an older bucket made while another replica starts the next
//! one (clocks a little apart, or an offline writer) stays in that older bucket (its history,
//! the hub, audits) but is not copied into the newer one, so the current view shows it only if
//! it is written again. Rolling documents suit data whose next write supersedes the last
//! (telemetry, status), not rarely written settings.

use crate::ids::{DocId, DocPrefix};

/// Buckets kept per logical document, at least.
pub const MIN_KEEP: u32 = 2;

/// A rolling policy for the logical documents under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rolling {
    prefix: DocPrefix,
    period_secs: u64,
    keep: u32,
}

impl Rolling {
    /// Documents under `prefix` roll every `period_secs` seconds; a replica keeps the `keep`
    /// newest buckets of each.
    pub fn new(prefix: DocPrefix, period_secs: u64, keep: u32) -> Result<Self, String> {
        if period_secs == 0 || period_secs > i64::MAX as u64 / 1000 {
            return Err(format!(
                "a rolling period of {period_secs} seconds is out of range; give at least 1"
            ));
        }
        if keep < MIN_KEEP {
            return Err(format!(
                "a rolling document must keep at least {MIN_KEEP} buckets (the current one and \
                 the one before, which the next starts from); {keep} given"
            ));
        }
        Ok(Rolling {
            prefix,
            period_secs,
            keep,
        })
    }

    /// The prefix whose documents roll.
    pub fn prefix(&self) -> &DocPrefix {
        &self.prefix
    }

    /// The period, in seconds.
    pub fn period_secs(&self) -> u64 {
        self.period_secs
    }

    /// Buckets kept per logical document.
    pub fn keep(&self) -> u32 {
        self.keep
    }

    /// The bucket of a time (milliseconds since the Unix epoch).
    pub fn bucket_at(&self, time_ms: i64) -> i64 {
        // Bucket 0 holds everything before 1970 (and clocks that read 0).
        time_ms.max(0).div_euclid(self.period_secs as i64 * 1000)
    }

    /// Whether `id` is a logical document of this policy: under the prefix, and not itself a
    /// bucket id (of any period).
    pub fn applies(&self, id: &DocId) -> bool {
        id.matches(&self.prefix) && split_any(id).is_none()
    }

    /// The id of a logical document's bucket, or `None` if it would be longer than a
    /// document id may be.
    pub fn bucket_id(&self, logical: &DocId, bucket: i64) -> Option<DocId> {
        DocId::new(format!("{logical}{}{bucket}", self.marker())).ok()
    }

    /// The logical document and bucket of a bucket id of this policy.
    pub fn split(&self, id: &DocId) -> Option<(DocId, i64)> {
        let (logical, period, bucket) = split_any(id)?;
        (period == self.period_secs && logical.matches(&self.prefix)).then_some((logical, bucket))
    }

    /// The start of every bucket id of `logical`, for range queries.
    pub fn bucket_prefix(&self, logical: &DocId) -> String {
        format!("{logical}{}", self.marker())
    }

    fn marker(&self) -> String {
        format!("@{}s.", self.period_secs)
    }
}

/// A hub's retention for rolling documents: the buckets under a prefix whose period ended
/// more than `max_age_secs` ago are dropped from the hub's store, and writes into them are
/// refused ([`crate::wire::ErrorCode::Expired`]). A bucket's age comes from its id, so hubs
/// and replicas need not agree on anything but the policy; documents that are not bucket ids
/// are never dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    prefix: DocPrefix,
    max_age_secs: u64,
}

impl Retention {
    /// Buckets under `prefix` are kept until `max_age_secs` after their period ends.
    pub fn new(prefix: DocPrefix, max_age_secs: u64) -> Result<Self, String> {
        if max_age_secs == 0 {
            return Err(
                "a retention of 0 seconds would refuse every write into a bucket that \
                        has ended; give at least 1"
                    .into(),
            );
        }
        Ok(Retention {
            prefix,
            max_age_secs,
        })
    }

    /// The prefix it applies to.
    pub fn prefix(&self) -> &DocPrefix {
        &self.prefix
    }

    /// How long a bucket is kept after its period ends, in seconds.
    pub fn max_age_secs(&self) -> u64 {
        self.max_age_secs
    }

    /// Whether `id` is a bucket under the prefix whose period ended more than the retention
    /// before `now_secs` (seconds since the Unix epoch).
    pub fn expired(&self, id: &DocId, now_secs: u64) -> bool {
        id.matches(&self.prefix)
            && bucket_end_secs(id)
                .is_some_and(|end| end.saturating_add(self.max_age_secs) <= now_secs)
    }
}

/// The logical document a bucket id belongs to (of any policy), or `None` for other ids: an
/// app watching `sensors/temp` is shown the changes of its buckets.
pub fn logical_of(id: &DocId) -> Option<DocId> {
    split_any(id).map(|(logical, _, _)| logical)
}

/// When a bucket id's period ends, in seconds since the Unix epoch, or `None` for ids that
/// are not bucket ids. A hub's retention ([`crate::hub::Retention`]) reads a bucket's age from
/// its id alone.
pub fn bucket_end_secs(id: &DocId) -> Option<u64> {
    let (_, period, bucket) = split_any(id)?;
    // `split_any` parses digits only, so the bucket is not negative.
    Some(
        u64::try_from(bucket)
            .ok()?
            .saturating_add(1)
            .saturating_mul(period),
    )
}

/// A bucket id's logical document, period and bucket: `LOGICAL@{period}s.{bucket}`, both
/// numbers in canonical decimal (no sign, no leading zeros).
fn split_any(id: &DocId) -> Option<(DocId, u64, i64)> {
    fn number<T: std::str::FromStr + ToString>(digits: &str) -> Option<T> {
        let n: T = digits.parse().ok()?;
        (digits.bytes().all(|b| b.is_ascii_digit()) && n.to_string() == digits).then_some(n)
    }
    let (logical, rest) = id.as_str().rsplit_once('@')?;
    let (period, bucket) = rest.split_once("s.")?;
    Some((DocId::new(logical).ok()?, number(period)?, number(bucket)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hourly() -> Rolling {
        Rolling::new(DocPrefix::new("sensors/").unwrap(), 3600, 3).unwrap()
    }

    #[test]
    fn bucket_ids_round_trip_and_only_canonical_ones_parse() {
        let r = hourly();
        let logical = DocId::new("sensors/temp").unwrap();
        let at = 1_764_633_600_000; // 2025-12-02T00:00:00Z
        let b = r.bucket_at(at);
        assert_eq!(b, 490_176);
        assert_eq!(r.bucket_at(at - 1), b - 1);
        let id = r.bucket_id(&logical, b).unwrap();
        assert_eq!(id.as_str(), "sensors/temp@3600s.490176");
        assert_eq!(r.split(&id), Some((logical.clone(), b)));
        assert!(r.applies(&logical));
        assert!(!r.applies(&id), "a bucket id is not itself rolled");
        for other in [
            "sensors/temp@3600s.0490176",
            "sensors/temp@60s.490176",
            "sensors/temp@3600s.",
            "sensors/temp@3600s.-1",
            "other/temp@3600s.5",
        ] {
            assert_eq!(r.split(&DocId::new(other).unwrap()), None, "{other}");
        }
        assert!(!r.applies(&DocId::new("other/temp").unwrap()));
    }

    #[test]
    fn bad_policies_are_refused_with_what_to_give() {
        let p = DocPrefix::new("s/").unwrap();
        assert!(
            Rolling::new(p.clone(), 0, 3)
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(
            Rolling::new(p.clone(), 60, 1)
                .unwrap_err()
                .contains("at least 2")
        );
        assert!(Rolling::new(p, u64::MAX, 3).is_err());
    }

    #[test]
    fn a_bucket_ends_one_period_after_it_starts() {
        let r = hourly();
        let logical = DocId::new("sensors/temp").unwrap();
        let id = r.bucket_id(&logical, 490_176).unwrap();
        assert_eq!(bucket_end_secs(&id), Some(490_177 * 3600));
        assert_eq!(bucket_end_secs(&logical), None);
        let huge = DocId::new(format!("x@{}s.{}", u64::MAX, i64::MAX)).unwrap();
        assert_eq!(
            bucket_end_secs(&huge),
            Some(u64::MAX),
            "saturates, never wraps"
        );
    }

    #[test]
    fn a_bucket_expires_its_retention_after_it_ends_and_nothing_else_does() {
        let keep_a_day = Retention::new(DocPrefix::new("sensors/").unwrap(), 86_400).unwrap();
        let logical = DocId::new("sensors/temp").unwrap();
        let id = hourly().bucket_id(&logical, 10).unwrap();
        let end = 11 * 3600;
        assert!(!keep_a_day.expired(&id, end + 86_399));
        assert!(keep_a_day.expired(&id, end + 86_400));
        assert!(!keep_a_day.expired(&logical, u64::MAX), "not a bucket");
        let elsewhere = DocId::new("other/x@3600s.10").unwrap();
        assert!(
            !keep_a_day.expired(&elsewhere, u64::MAX),
            "not under the prefix"
        );
        assert!(Retention::new(DocPrefix::all(), 0).is_err());
    }

    #[test]
    fn a_logical_id_too_long_for_a_bucket_has_none() {
        let r = hourly();
        let long = DocId::new(format!("sensors/{}", "a".repeat(240))).unwrap();
        assert_eq!(r.bucket_id(&long, 490_176), None);
    }
}
