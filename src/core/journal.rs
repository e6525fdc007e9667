//! The reservation journal port: in durable mode a call's reservation is on disk before the
//! call is forwarded, so that a call the model server worked on is on the books exactly once
//! even after `kill -9` or a power loss. `store/` implements it (a file journal with group
//! commit); the gate writes reservations and settlements, the usage writer closes them once
//! the settled call is durable in the store, and [`recover`] settles what a hard stop left open.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::records::{CallOutcome, CallRecord, EncodedCall, Usage};
use super::store::{Store, StoreError};

/// What a call reserved, as written before it is forwarded: enough to settle it at the next
/// start if the gateway dies before it settles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// When the call was admitted, microseconds since the epoch.
    pub at_micros: i64,
    pub request_id: String,
    pub key_id: String,
    pub user_id: String,
    pub model: String,
    /// The catalogue version the call went to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub stream: bool,
    /// The tokens reserved: the prompt estimate, and the output cap as completion.
    pub estimate: Usage,
    pub images: u32,
    /// The worst cost reserved: what the call is charged if the gateway dies during it.
    #[serde(default)]
    pub cost: super::money::Money,
}

/// A reservation being written; `durable` answers once its sync is done.
#[derive(Debug)]
pub struct PendingReservation {
    /// The reservation's journal id, unique across restarts.
    pub id: u64,
    pub durable: oneshot::Receiver<Result<(), StoreError>>,
}

/// A reservation the last run left open, and its settlement if that reached the journal.
#[derive(Clone, Debug, PartialEq)]
pub struct Unsettled {
    pub id: u64,
    pub reservation: Reservation,
    pub settled: Option<CallRecord>,
}

/// Where reservations are made durable. Writing never blocks the caller: durability is
/// awaited through [`PendingReservation::durable`], and concurrent reservations share one
/// sync (group commit), so the cost per call stays small.
pub trait ReservationJournal: Send + Sync + std::fmt::Debug + 'static {
    /// Writes `reservation` under a new id; durable once `durable` answers `Ok`.
    fn reserve(&self, reservation: Reservation) -> PendingReservation;
    /// The call of reservation `call.call.reservation` settled: kept (without a sync of
    /// its own) so that a hard stop before the store has it can still charge its real usage.
    fn settled(&self, call: &EncodedCall);
    /// These reservations' settled calls are durable in the store: the journal may forget them.
    fn close(&self, reservations: Vec<u64>);
    /// The reservations the last run left open, as read when the journal was opened.
    fn unsettled(&self) -> Vec<Unsettled>;
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Settled from the journal's copy of their settlement (the store had not got them).
    pub from_settlement: usize,
    /// Settled with their reservation's estimate and marked [`CallOutcome::Interrupted`].
    pub interrupted: usize,
    /// Already in the store: only closed.
    pub already_recorded: usize,
}

/// Settles, exactly once, every reservation the last run left open: a call whose settlement
/// reached the journal is recorded as it settled; any other is charged its reservation and
/// marked interrupted; one the store already holds (keyed by its reservation) is left alone.
/// Everything is durable in the store before the journal is told to forget it. Runs at
/// start, before the gate loads any key, so the counters loaded include what it records.
pub fn recover(
    store: &dyn Store,
    journal: &dyn ReservationJournal,
) -> Result<Recovery, StoreError> {
    let open = journal.unsettled();
    if open.is_empty() {
        return Ok(Recovery::default());
    }
    let ids: Vec<u64> = open.iter().map(|u| u.id).collect();
    let recorded = store.recorded_reservations(&ids)?;
    let mut recovery = Recovery::default();
    let mut calls = Vec::new();
    for unsettled in open {
        if recorded.contains(&unsettled.id) {
            recovery.already_recorded += 1;
            continue;
        }
        match unsettled.settled {
            Some(mut call) => {
                call.reservation = Some(unsettled.id);
                recovery.from_settlement += 1;
                calls.push(call);
            }
            None => {
                recovery.interrupted += 1;
                calls.push(interrupted_call(unsettled.id, unsettled.reservation));
            }
        }
    }
    // Idempotent: a second recovery (killed before the journal forgot these) skips them.
    store.record_calls(&calls)?;
    store.flush()?;
    journal.close(ids);
    Ok(recovery)
}

/// The call log entry of a call the gateway died in: charged what it had reserved.
fn interrupted_call(id: u64, r: Reservation) -> CallRecord {
    CallRecord {
        at_micros: r.at_micros,
        request_id: r.request_id,
        key_id: r.key_id,
        user_id: r.user_id,
        model: r.model,
        version: r.version,
        cost: r.cost,
        // No status reached the client from the gateway.
        status: 0,
        outcome: CallOutcome::Interrupted,
        stream: r.stream,
        latency_ms: 0,
        charged_request: true,
        usage: r.estimate,
        usage_estimated: true,
        images: r.images,
        image_sizes: Vec::new(),
        client_addr: None,
        request_body: None,
        response_body: None,
        reservation: Some(id),
        cache_hit: false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::core::testing::{MemoryStore, call, key, user};

    /// A journal that holds what it is given in memory.
    #[derive(Debug, Default)]
    struct MemoryJournal {
        open: Vec<Unsettled>,
        closed: Mutex<Vec<u64>>,
    }

    impl ReservationJournal for MemoryJournal {
        fn reserve(&self, _: Reservation) -> PendingReservation {
            unreachable!("recovery makes no reservation")
        }
        fn settled(&self, _: &EncodedCall) {}
        fn close(&self, reservations: Vec<u64>) {
            self.closed.lock().unwrap().extend(reservations);
        }
        fn unsettled(&self) -> Vec<Unsettled> {
            self.open.clone()
        }
    }

    fn reservation(request_id: &str) -> Reservation {
        Reservation {
            at_micros: 1_000,
            request_id: request_id.into(),
            key_id: "key_a".into(),
            user_id: "usr_1".into(),
            model: "m".into(),
            version: None,
            stream: true,
            estimate: Usage {
                prompt_tokens: 10,
                completion_tokens: 90,
            },
            images: 1,
            cost: crate::core::money::Money(250),
        }
    }

    #[test]
    fn open_reservations_are_settled_once_with_the_best_figure_known() {
        let store = MemoryStore::with(vec![user("usr_1")], vec![key("key_a", "s")]);
        let mut settled = call("key_a", 2_000, "m", 7);
        settled.reservation = Some(2);
        let mut already = call("key_a", 3_000, "m", 5);
        already.reservation = Some(3);
        store.record_calls(std::slice::from_ref(&already)).unwrap();
        let journal = MemoryJournal {
            open: vec![
                Unsettled {
                    id: 1,
                    reservation: reservation("cut"),
                    settled: None,
                },
                Unsettled {
                    id: 2,
                    reservation: reservation("done"),
                    settled: Some(settled),
                },
                Unsettled {
                    id: 3,
                    reservation: reservation("written"),
                    settled: Some(already),
                },
            ],
            ..MemoryJournal::default()
        };
        let recovery = recover(&store, &journal).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                from_settlement: 1,
                interrupted: 1,
                already_recorded: 1,
            }
        );
        assert_eq!(*journal.closed.lock().unwrap(), [1, 2, 3]);
        let (_, counters) = store.load_key("key_a").unwrap().unwrap();
        // 5 + 1 (already), 7 + 1 (from its settlement), 10 + 90 (the reservation).
        assert_eq!(counters.requests, 3);
        assert_eq!(counters.tokens(), 6 + 8 + 100);
        assert_eq!(counters.images, 1);
        let cut = store.calls_recorded();
        let cut = cut.iter().find(|c| c.request_id == "cut").unwrap();
        assert_eq!(cut.outcome, CallOutcome::Interrupted);
        assert!(cut.usage_estimated && cut.charged_request);
        assert_eq!(cut.reservation, Some(1));

        // A second recovery of the same journal (killed before it forgot them) adds nothing.
        assert_eq!(recover(&store, &journal).unwrap().already_recorded, 3);
        let (_, again) = store.load_key("key_a").unwrap().unwrap();
        assert_eq!(again, counters);
    }
}
