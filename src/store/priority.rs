//! The usage writer gives the CPU to the threads serving calls: a batch of the books that
//! starts while a call is in flight must not make the call wait (issue 21; BENCHMARKS.md,
//! "The tail and memory (issue 21): session 4").
//!
//! Linux lets any thread enter the background class (`SCHED_IDLE`) but only a privileged
//! one (root, `CAP_SYS_NICE`, or `RLIMIT_NICE` ≥ 20) leave it, and a writer that cannot
//! leave it would fall behind without bound on a saturated CPU. So a probe thread tries
//! both ways first; where it cannot come back, the writer keeps the normal class.

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
    set_thread_priority_and_policy, thread_native_id,
};

/// Whether a thread may enter the background class and leave it again, found once by a
/// thread that does both.
pub fn background_is_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("priority-probe".into())
            .spawn(|| set_background(true) && set_background(false))
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

/// Moves the calling thread into the background (`SCHED_IDLE`: it runs when no call needs
/// the CPU, and a runtime worker woken by a call takes the CPU from it at once), or back
/// to the normal class when it must catch up. Returns whether it did; a failure costs only
/// the tail, so it is logged at debug level.
pub fn set_background(background: bool) -> bool {
    let policy = if background {
        NormalThreadSchedulePolicy::Idle
    } else {
        NormalThreadSchedulePolicy::Other
    };
    // Nice 0 in both (the crate's `Min` would be nice 19, which starved the writer it
    // meant to bring back: seen at 20,000 calls/s as a backlog that only grew).
    let set = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Os(ThreadPriorityOsValue::default()),
        ThreadSchedulePolicy::Normal(policy),
    );
    if let Err(e) = &set {
        tracing::debug!(error = ?e, background, "could not change a thread's scheduling class");
    }
    set.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's scheduling policy and nice value, from `/proc` (fields 41 and 19).
    fn policy_of_this_thread() -> (String, String) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Counted from the field after the command's closing parenthesis (field 3).
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        (fields[38].to_owned(), fields[16].to_owned())
    }

    #[test]
    fn a_thread_goes_to_the_background_and_back_where_allowed() {
        let reversible = background_is_reversible();
        std::thread::spawn(move || {
            assert!(set_background(true));
            assert_eq!(policy_of_this_thread().0, "5", "SCHED_IDLE");
            // Back only where the probe found it allowed (root, CAP_SYS_NICE, RLIMIT_NICE),
            // and back at nice 0: a normal thread at nice 19 would still be starved.
            assert_eq!(set_background(false), reversible);
            if reversible {
                assert_eq!(policy_of_this_thread(), ("0".into(), "0".into()));
            }
        })
        .join()
        .unwrap();
    }
}
