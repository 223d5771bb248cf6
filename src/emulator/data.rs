//! The emulator's deterministic data set: every user has their own jobs
//! (ids derived from the user id, so two users never share one), enough to
//! page through, covering every job type (1–7) and status (0–3).

use serde::Serialize;

/// One batch task, in KooDrive's `JobInfo` shape.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JobInfo {
    pub task_id: String,
    pub task_type: u8,
    pub action_type: u16,
    pub status: u8,
    pub task_result_code: u8,
    pub result_code: u32,
    pub content_num: u32,
    pub container_id: String,
    pub tenant_id: String,
    pub begin_time: String,
    pub end_time: String,
    pub create_time: String,
}

/// FNV-1a: a stable hash so the data set is the same on every run.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// All jobs of `user_id`, newest first: 40–64 of them.
pub fn jobs_of(user_id: &str) -> Vec<JobInfo> {
    let seed = fnv1a(user_id.as_bytes());
    let count = 40 + (seed % 25) as usize;
    // 2023-12-27 15:19:04 UTC, minus one hour per job.
    let newest = 1_703_690_344i64;
    (0..count)
        .map(|i| {
            let id_hash = fnv1a(format!("{user_id}/{i}").as_bytes());
            let task_type = (i % 7) as u8 + 1;
            let status = (i % 4) as u8;
            let created = newest - (i as i64) * 3600;
            let finished = status == 2 || status == 3;
            JobInfo {
                task_id: format!(
                    "{}",
                    1_000_000_000_000_000_000 + id_hash % 9_000_000_000_000_000_000
                ),
                task_type,
                action_type: u16::from(task_type) * 100 + 1,
                status,
                task_result_code: if status == 2 { (i % 3) as u8 + 1 } else { 0 },
                result_code: 0,
                content_num: (id_hash % 50) as u32 + 1,
                container_id: format!("IAAD{:016x}{:016x}", seed, id_hash),
                tenant_id: format!("tenant-{:08x}", seed as u32),
                begin_time: timestamp(created + 5),
                end_time: if finished {
                    timestamp(created + 65)
                } else {
                    String::new()
                },
                create_time: timestamp(created),
            }
        })
        .collect()
}

/// KooDrive's time format in the doc's example: `yyyyMMddHHmmss`.
fn timestamp(unix: i64) -> String {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

/// One page of `user_id`'s jobs after filtering by type and status.
pub fn page(
    user_id: &str,
    offset: u64,
    limit: u64,
    job_type: Option<u8>,
    status: Option<u8>,
) -> Vec<JobInfo> {
    jobs_of(user_id)
        .into_iter()
        .filter(|j| job_type.is_none_or(|t| j.task_type == t))
        .filter(|j| status.is_none_or(|s| j.status == s))
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn data_is_deterministic_per_user() {
        assert_eq!(jobs_of("u-1"), jobs_of("u-1"));
    }

    #[test]
    fn users_never_share_job_ids() {
        let a: HashSet<_> = jobs_of("u-1").into_iter().map(|j| j.task_id).collect();
        let b: HashSet<_> = jobs_of("u-2").into_iter().map(|j| j.task_id).collect();
        assert!(a.is_disjoint(&b));
    }

    #[test]
    fn every_type_and_status_combination_exists() {
        let jobs = jobs_of("anyone");
        assert!(jobs.len() >= 40);
        for t in 1..=7 {
            for s in 0..=3 {
                assert!(
                    jobs.iter().any(|j| j.task_type == t && j.status == s),
                    "{t}/{s}"
                );
            }
        }
    }

    #[test]
    fn paging_and_filters_apply() {
        let all = jobs_of("u-1");
        assert_eq!(page("u-1", 0, 2, None, None), all[..2].to_vec());
        assert_eq!(page("u-1", 2, 3, None, None), all[2..5].to_vec());
        assert!(page("u-1", 1_000, 10, None, None).is_empty());
        assert!(page("u-1", 0, 100, Some(3), Some(1))
            .iter()
            .all(|j| j.task_type == 3 && j.status == 1));
    }
}
