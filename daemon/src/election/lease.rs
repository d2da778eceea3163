//! The Kubernetes Lease election as a pure state machine (sans-IO, in the
//! manner of quinn-proto): every entry point takes `now`, requests to the
//! API server come out of [`Elector::poll_request`], their results go in
//! through [`Elector::handle`], and role changes come out of
//! [`Elector::poll_role`]. It reads no clock and does no I/O; the wall
//! clock, needed only for the Lease's informative `renewTime` and
//! `acquireTime`, is passed in as text.
//!
//! The rules are client-go's leader election (`tools/leaderelection`),
//! with these choices:
//!
//! - **Expiry is judged on this replica's monotonic clock**, from when it
//!   *observed* the Lease change (a new `resourceVersion`), never from the
//!   timestamps written in the Lease: clocks of two nodes need not agree.
//! - **The holder steps down on its own deadline**: it is
//!   [`Role::Active`] only until `renew_deadline` after it *sent* its last
//!   successful write. Another replica observes that write at the earliest
//!   when it committed, which is after it was sent, and may take the Lease
//!   only `lease_duration` after that observation. With `renew_deadline <
//!   lease_duration` the holder is standby at least `lease_duration -
//!   renew_deadline` before anyone else can be active, whatever the network
//!   did in between: that margin is for the daemon to stop acting as active.
//! - **Every write is optimistic** (`resourceVersion`): of two replicas
//!   that both saw the Lease expire, one write succeeds and the other gets
//!   409 Conflict and looks again.
//! - **The holder renews without reading first** (it knows the
//!   `resourceVersion` its last write produced); a standby reads every
//!   `retry_period` and, if the Lease is free or expired, writes at once.
//!   A standby also wakes at the moment the Lease it observed expires and
//!   tries to take it then, instead of waiting for its next read.
//! - **Release on shutdown**: the holder goes standby first, then clears
//!   `holderIdentity`; a standby sees a Lease without holder as free and
//!   takes it on its next read (within one `retry_period`).
//!
//! What the API server being unreachable means: the holder cannot renew,
//! so it steps down after `renew_deadline` and nobody is active until the
//! API server answers again. That is the price of never having two active
//! replicas; the daemon's docs say so.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What this replica is, as the daemon acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Not the active gateway (healthy, warm, waiting).
    Standby,
    /// The active gateway. `term` is the Lease's `leaseTransitions` of this
    /// tenure: it grows with every change of holder, so two tenures never
    /// share a term.
    Active {
        /// `leaseTransitions` when this tenure began.
        term: u32,
    },
}

impl Role {
    /// Whether this is [`Role::Active`].
    pub fn is_active(self) -> bool {
        matches!(self, Role::Active { .. })
    }
}

/// The election's timing (client-go's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease holds after it was last seen to change: what this
    /// replica writes as `leaseDurationSeconds` (whole seconds: the API
    /// counts seconds).
    pub lease_duration: Duration,
    /// The holder steps down when it has had no successful renewal for this
    /// long (counted from when the renewal was sent). Shorter than
    /// `lease_duration`: the difference is the margin in which the daemon
    /// stops acting as active before anyone else may take over.
    pub renew_deadline: Duration,
    /// How often the holder renews and a standby reads the Lease.
    pub retry_period: Duration,
    /// A request without an answer after this long is given up. Shorter
    /// than `retry_period`, so that one hung request never delays the next.
    pub request_timeout: Duration,
}

impl Default for Timing {
    /// 2 s lease, step down 1.5 s after the last renewal, renew every
    /// 500 ms, give up a request after 400 ms: failover within
    /// `lease_duration + retry_period` (2.5 s) plus one request when the
    /// holder dies, within one `retry_period` when it stops cleanly.
    fn default() -> Self {
        Timing::new(
            Duration::from_secs(2),
            Duration::from_millis(1500),
            Duration::from_millis(500),
        )
    }
}

impl Timing {
    /// The timing with the request timeout derived from the retry period
    /// (four fifths of it).
    pub fn new(lease_duration: Duration, renew_deadline: Duration, retry_period: Duration) -> Self {
        Timing {
            lease_duration,
            renew_deadline,
            retry_period,
            request_timeout: retry_period * 4 / 5,
        }
    }

    /// Every problem with this timing at once, each naming the setting at
    /// fault (by the config key names below) and what to do. Empty when it
    /// is usable.
    pub fn problems(&self) -> Vec<String> {
        let ms = |d: Duration| d.as_millis();
        let mut out = Vec::new();
        let lease = self.lease_duration;
        if lease < Duration::from_secs(1) || lease.subsec_nanos() != 0 {
            out.push(format!(
                "lease_duration_ms = {}: must be a whole number of seconds, at least 1000 \
                 (the Lease's leaseDurationSeconds counts seconds)",
                ms(lease)
            ));
        }
        if self.renew_deadline >= lease {
            out.push(format!(
                "renew_deadline_ms = {} must be less than lease_duration_ms = {}: the active \
                 replica must step down before its Lease can be taken",
                ms(self.renew_deadline),
                ms(lease)
            ));
        }
        if self.retry_period < Duration::from_millis(100) {
            out.push(format!(
                "retry_period_ms = {}: must be at least 100 (each replica sends one request \
                 to the API server per retry period)",
                ms(self.retry_period)
            ));
        }
        // Like client-go (renewDeadline > 1.2 × retryPeriod): the holder
        // gets at least one more try before it steps down.
        if self.renew_deadline * 5 <= self.retry_period * 6 {
            out.push(format!(
                "renew_deadline_ms = {} must be more than 1.2 × retry_period_ms = {}: the active \
                 replica needs a second renewal attempt before its deadline",
                ms(self.renew_deadline),
                ms(self.retry_period)
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > self.retry_period {
            out.push(format!(
                "the request timeout ({} ms) must be positive and at most retry_period_ms = {}",
                ms(self.request_timeout),
                ms(self.retry_period)
            ));
        }
        out
    }

    /// `lease_duration` in whole seconds, as written into the Lease.
    fn lease_duration_seconds(&self) -> u32 {
        u32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(u32::MAX)
    }
}

/// The fields of a Lease's `spec` the election uses. Times are the API's
/// `MicroTime` text, informative only: the election never compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSpec {
    /// `holderIdentity`; `None` (or empty) when nobody holds it.
    pub holder: Option<String>,
    /// `leaseDurationSeconds`.
    pub lease_duration_seconds: Option<u32>,
    /// `acquireTime`.
    pub acquire_time: Option<String>,
    /// `renewTime`.
    pub renew_time: Option<String>,
    /// `leaseTransitions`: how many times the holder changed.
    pub transitions: u32,
}

impl LeaseSpec {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// A Lease as read from (or written to) the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its spec.
    pub spec: LeaseSpec,
    /// `metadata.resourceVersion`: the version a write must name.
    pub resource_version: String,
}

/// A request the driver must send to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Give it back with its outcome ([`Elector::handle`]); a late outcome
    /// of a request given up is recognised by it and ignored.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// One call to the API server about the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// GET the Lease.
    Get,
    /// POST a new Lease with this spec (it did not exist).
    Create(LeaseSpec),
    /// PUT this spec, only if the Lease is still at `resource_version`.
    Update {
        /// The new spec.
        spec: LeaseSpec,
        /// The version it must still have (optimistic concurrency).
        resource_version: String,
    },
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// GET: the Lease.
    Found(Lease),
    /// GET: there is no such Lease (404).
    NotFound,
    /// POST or PUT succeeded; the Lease as stored.
    Written(Lease),
    /// POST or PUT refused: 409 (the Lease exists, or changed since the
    /// version named).
    Conflict,
    /// Anything else: no connection, a timeout, 401/403, 5xx, a body that
    /// does not parse. The text says what, for the log.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Acquire,
    Renew,
    Release,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    sent: Instant,
    kind: Kind,
}

/// What this replica last saw of the Lease, and when (its own clock).
#[derive(Debug, Clone)]
struct Observation {
    /// `None`: there is no Lease.
    lease: Option<Lease>,
    /// When this version was first seen.
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Shutting down: clear the holder if we hold the Lease, until then.
    Releasing {
        give_up: Instant,
    },
    Finished,
}

/// Why the elector wants to be woken ([`Elector::poll_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A request is due (renewal, read, or the observed Lease expires).
    Request,
    /// The request in flight is to be given up.
    RequestTimeout,
    /// The active role ends unless a renewal succeeds before.
    RenewDeadline,
    /// Shutting down: stop trying to release the Lease.
    ReleaseGiveUp,
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    next_id: u64,
    in_flight: Option<InFlight>,
    observed: Option<Observation>,
    /// The Lease must be read before the next write (after a conflict).
    stale: bool,
    /// The observation was just read: decide on it without reading again.
    fresh: bool,
    /// When the last successful write of ours as holder was sent.
    renewed_sent: Option<Instant>,
    /// When the last answered read was sent: reads go out once per retry
    /// period, counted from send to send.
    read_sent: Option<Instant>,
    next_attempt: Instant,
    role: Role,
    roles: VecDeque<Role>,
    phase: Phase,
}

impl Elector {
    /// A replica named `identity` (its `holderIdentity`), standby, whose
    /// first request is due at `now`.
    pub fn new(identity: impl Into<String>, timing: Timing, now: Instant) -> Self {
        Elector {
            identity: identity.into(),
            timing,
            next_id: 0,
            in_flight: None,
            observed: None,
            stale: true,
            fresh: false,
            renewed_sent: None,
            read_sent: None,
            next_attempt: now,
            role: Role::Standby,
            roles: VecDeque::new(),
            phase: Phase::Running,
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The id of the request in flight, if any: a driver still waiting for
    /// another one should drop it (it was given up).
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.map(|r| r.id)
    }

    /// The timing it runs with.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The next role change, in order (each differs from the one before).
    pub fn poll_role(&mut self) -> Option<Role> {
        self.roles.pop_front()
    }

    /// Whether the elector is done: it was shut down and has released the
    /// Lease, or found it was not the holder, or gave up.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// The request to send now, if one is due and none is in flight.
    /// `wall_clock` is the current wall-clock time in the API's MicroTime
    /// form (`2026-12-06T02:14:10.123456Z`), written into the Lease as
    /// `renewTime`/`acquireTime` and never read back.
    pub fn poll_request(&mut self, now: Instant, wall_clock: &str) -> Option<Request> {
        self.handle_timeout(now);
        if self.in_flight.is_some() {
            return None;
        }
        let (kind, op) = match self.phase {
            Phase::Finished => return None,
            Phase::Releasing { .. } => {
                if now < self.next_attempt {
                    return None;
                }
                if self.stale {
                    (Kind::Get, Op::Get)
                } else {
                    match self.observed_lease().filter(|l| self.holds(l)) {
                        Some(lease) => {
                            let spec = LeaseSpec {
                                holder: None,
                                // As client-go releases: expired at once
                                // even for a reader that ignores the
                                // empty holder.
                                lease_duration_seconds: Some(1),
                                acquire_time: Some(wall_clock.to_owned()),
                                renew_time: Some(wall_clock.to_owned()),
                                transitions: lease.spec.transitions,
                            };
                            let resource_version = lease.resource_version.clone();
                            (
                                Kind::Release,
                                Op::Update {
                                    spec,
                                    resource_version,
                                },
                            )
                        }
                        None => {
                            self.phase = Phase::Finished;
                            return None;
                        }
                    }
                }
            }
            Phase::Running => {
                if now < self.next_attempt {
                    return None;
                }
                self.decide(now, wall_clock)?
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight = Some(InFlight {
            id,
            sent: now,
            kind,
        });
        Some(Request { id, op })
    }

    /// What to send when an attempt is due; `None` (and the next attempt
    /// scheduled) when nothing is to be done yet.
    fn decide(&mut self, now: Instant, wall_clock: &str) -> Option<(Kind, Op)> {
        let fresh = std::mem::take(&mut self.fresh);
        let observed = match &self.observed {
            Some(o) if !self.stale => o.clone(),
            _ => return Some((Kind::Get, Op::Get)),
        };
        let Some(lease) = observed.lease else {
            let spec = self.spec_acquired(0, wall_clock);
            return Some((Kind::Acquire, Op::Create(spec)));
        };
        let resource_version = lease.resource_version.clone();
        if self.holds(&lease) {
            let spec = LeaseSpec {
                holder: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.timing.lease_duration_seconds()),
                acquire_time: lease.spec.acquire_time.clone(),
                renew_time: Some(wall_clock.to_owned()),
                transitions: lease.spec.transitions,
            };
            return Some((
                Kind::Renew,
                Op::Update {
                    spec,
                    resource_version,
                },
            ));
        }
        let expires = self.expiry(&observed.at, &lease);
        if lease.spec.holder().is_none() || now >= expires {
            let spec = self.spec_acquired(lease.spec.transitions.saturating_add(1), wall_clock);
            return Some((
                Kind::Acquire,
                Op::Update {
                    spec,
                    resource_version,
                },
            ));
        }
        if fresh {
            // Just read, held by someone else: read again in a retry
            // period, or try to take it the moment it expires.
            let next_read = self
                .read_sent
                .map_or(now, |sent| sent + self.timing.retry_period)
                .max(now);
            self.next_attempt = expires.min(next_read);
            None
        } else {
            Some((Kind::Get, Op::Get))
        }
    }

    fn spec_acquired(&self, transitions: u32, wall_clock: &str) -> LeaseSpec {
        LeaseSpec {
            holder: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration_seconds()),
            acquire_time: Some(wall_clock.to_owned()),
            renew_time: Some(wall_clock.to_owned()),
            transitions,
        }
    }

    fn holds(&self, lease: &Lease) -> bool {
        lease.spec.holder() == Some(self.identity.as_str())
    }

    fn observed_lease(&self) -> Option<&Lease> {
        self.observed.as_ref()?.lease.as_ref()
    }

    /// When a Lease first seen at `at` expires, by its own duration (ours
    /// when it has none: never earlier than we would let ours expire).
    fn expiry(&self, at: &Instant, lease: &Lease) -> Instant {
        let duration = match lease.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(u64::from(s)),
            _ => self.timing.lease_duration,
        };
        *at + duration
    }

    /// Records what was seen; the observation time moves only when the
    /// Lease changed.
    fn observe(&mut self, now: Instant, lease: Option<Lease>) {
        let unchanged = self.observed.as_ref().is_some_and(|o| o.lease == lease);
        if !unchanged {
            self.observed = Some(Observation { lease, at: now });
        }
        self.stale = false;
    }

    /// The outcome of request `id`. Outcomes of requests given up (or of
    /// no request) are ignored.
    pub fn handle(&mut self, now: Instant, id: u64, outcome: Outcome) {
        let Some(request) = self.in_flight.filter(|r| r.id == id) else {
            return;
        };
        self.in_flight = None;
        let retry = request.sent + self.timing.retry_period;
        let failed = matches!(outcome, Outcome::Failed(_));
        match outcome {
            Outcome::Found(lease) => {
                self.read_sent = Some(request.sent);
                let other_holds = !self.holds(&lease);
                self.observe(now, Some(lease));
                if other_holds {
                    // Someone else holds it: whatever we thought, we are
                    // not active.
                    self.renewed_sent = None;
                    self.set_role(Role::Standby);
                }
                self.fresh = true;
                self.next_attempt = now;
            }
            Outcome::NotFound => {
                self.read_sent = Some(request.sent);
                self.observe(now, None);
                self.renewed_sent = None;
                self.set_role(Role::Standby);
                self.fresh = true;
                self.next_attempt = now;
            }
            Outcome::Written(lease) => {
                let ours = self.holds(&lease);
                let term = lease.spec.transitions;
                self.observe(now, Some(lease));
                if request.kind == Kind::Release {
                    self.phase = Phase::Finished;
                } else if ours && self.phase == Phase::Running {
                    self.renewed_sent = Some(request.sent);
                    // An answer that came after its own deadline confirms
                    // nothing we could still act on.
                    if now < request.sent + self.timing.renew_deadline {
                        self.set_role(Role::Active { term });
                    }
                }
                self.next_attempt = retry;
            }
            Outcome::Conflict => {
                // The Lease changed under us: read it before anything else.
                self.stale = true;
                self.next_attempt = now;
            }
            Outcome::Failed(_) => {
                self.next_attempt = retry;
            }
        }
        if matches!(self.phase, Phase::Releasing { .. }) && !failed {
            // Shutting down: the release goes out at once (a failed try is
            // repeated a retry period later).
            self.next_attempt = now;
        }
        self.handle_timeout(now);
    }

    /// Applies what time alone changes: a request given up, the end of the
    /// active role, the end of a release.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(r) = self.in_flight
            && now >= r.sent + self.timing.request_timeout
        {
            // Given up. A write may still have committed: the next write
            // names the old version and gets a conflict, which reads again.
            self.in_flight = None;
            self.next_attempt = self.next_attempt.max(r.sent + self.timing.retry_period);
        }
        if let Some(sent) = self.renewed_sent
            && now >= sent + self.timing.renew_deadline
        {
            self.set_role(Role::Standby);
        }
        if let Phase::Releasing { give_up } = self.phase
            && now >= give_up
        {
            self.phase = Phase::Finished;
        }
    }

    /// When to call [`Elector::handle_timeout`] / [`Elector::poll_request`]
    /// next, and why. `None` once finished.
    pub fn poll_timeout(&self) -> Option<(Instant, Wake)> {
        let mut best: Option<(Instant, Wake)> = None;
        let mut consider = |at: Instant, why: Wake| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        match self.phase {
            Phase::Finished => return None,
            Phase::Releasing { give_up } => consider(give_up, Wake::ReleaseGiveUp),
            Phase::Running => {}
        }
        match self.in_flight {
            Some(r) => consider(r.sent + self.timing.request_timeout, Wake::RequestTimeout),
            None => consider(self.next_attempt, Wake::Request),
        }
        if self.role.is_active()
            && let Some(sent) = self.renewed_sent
        {
            consider(sent + self.timing.renew_deadline, Wake::RenewDeadline);
        }
        best
    }

    /// Begins a clean stop: standby at once, then (if this replica holds
    /// the Lease) a write that clears the holder, so that a standby takes
    /// over on its next read instead of waiting for the Lease to expire.
    /// Call it once the daemon no longer acts as active: the Lease is then
    /// released for others. Gives up after `renew_deadline`.
    pub fn release(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        self.set_role(Role::Standby);
        self.renewed_sent = None;
        // A request in flight (a renewal, most likely) is waited for, not
        // abandoned: the release then names the version it produced
        // instead of getting a conflict and reading again.
        self.phase = Phase::Releasing {
            give_up: now + self.timing.renew_deadline,
        };
        self.next_attempt = now;
        if self.observed.is_none() && self.in_flight.is_none() {
            // Never saw the Lease: nothing of ours to release.
            self.phase = Phase::Finished;
        }
    }

    fn set_role(&mut self, role: Role) {
        if self.role != role {
            self.role = role;
            self.roles.push_back(role);
        }
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
