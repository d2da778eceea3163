//! The election against a *simulated* API server: an in-memory Lease
//! store with optimistic concurrency ([`SimulatedStore`]), replicas whose
//! links to it can fail in several ways ([`Link`]), and a virtual clock.
//! Nothing here is a real API server; `kubernetes_tests.rs` drives the
//! real adapter against a fake HTTPS one.
//!
//! Every step of every scenario checks the invariant the election exists
//! for ([`World::check_safety`]): at most one replica is active, and a new
//! active replica begins at least `lease_duration - renew_deadline` after
//! the previous one stopped (unless that one released the Lease cleanly).

#![allow(clippy::unwrap_used)]

use super::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// The Lease as a simulated API server keeps it: one object, a resource
/// version bumped by every write, writes refused when they name an old one.
#[derive(Debug, Default)]
struct SimulatedStore {
    lease: Option<(LeaseSpec, u64)>,
    version: u64,
    writes: u32,
}

impl SimulatedStore {
    fn apply(&mut self, op: &Op) -> Outcome {
        let current = self.lease.as_ref().map(|(_, rv)| rv.to_string());
        match op {
            Op::Get => match &self.lease {
                Some((spec, rv)) => Outcome::Found(Lease {
                    spec: spec.clone(),
                    resource_version: rv.to_string(),
                }),
                None => Outcome::NotFound,
            },
            Op::Create(spec) if current.is_none() => self.store(spec),
            Op::Update {
                spec,
                resource_version,
            } if current.as_ref() == Some(resource_version) => self.store(spec),
            // POST of an existing Lease (409 AlreadyExists), PUT naming an
            // old version (409 Conflict) or a missing Lease (404, which
            // the adapter reports as a conflict too).
            Op::Create(_) | Op::Update { .. } => Outcome::Conflict,
        }
    }

    fn store(&mut self, spec: &LeaseSpec) -> Outcome {
        self.version += 1;
        self.writes += 1;
        self.lease = Some((spec.clone(), self.version));
        Outcome::Written(Lease {
            spec: spec.clone(),
            resource_version: self.version.to_string(),
        })
    }

    fn holder(&self) -> Option<String> {
        self.lease.as_ref().and_then(|(s, _)| s.holder.clone())
    }
}

/// A replica's path to the simulated API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Requests and answers are lost (a partition, a dead API server).
    Down,
    /// Requests reach the store, answers are lost.
    AnswersLost,
    /// Each request and each answer is lost with this probability in
    /// percent (from a seeded generator: the same losses every run).
    Flaky(u32),
}

#[derive(Debug)]
struct Replica {
    elector: Elector,
    link: Link,
    /// The process runs (false after a crash, or once released).
    alive: bool,
    /// Active as the daemon sees it, and since when.
    active_since: Option<Instant>,
    /// When it last stopped being active.
    stopped_at: Option<Instant>,
    /// It released the Lease cleanly.
    released: bool,
    changes: Vec<(Duration, Role)>,
}

#[derive(Debug)]
enum Event {
    /// A request reaches the store.
    Commit { replica: usize, id: u64, op: Op },
    /// An answer reaches a replica.
    Answer {
        replica: usize,
        id: u64,
        outcome: Outcome,
    },
}

/// Replicas, the simulated store and the virtual clock.
struct World {
    t0: Instant,
    now: Instant,
    timing: Timing,
    /// Round trip to the store (commit at half of it).
    rtt: Duration,
    store: SimulatedStore,
    replicas: Vec<Replica>,
    events: Vec<(Instant, u64, Event)>,
    seq: u64,
    rng: u64,
}

impl World {
    fn new(replicas: usize, timing: Timing, rtt: Duration) -> Self {
        let t0 = Instant::now();
        World {
            t0,
            now: t0,
            timing,
            rtt,
            store: SimulatedStore::default(),
            replicas: (0..replicas)
                .map(|i| Replica {
                    elector: Elector::new(format!("gw-{i}"), timing, t0),
                    link: Link::Up,
                    alive: true,
                    active_since: None,
                    stopped_at: None,
                    released: false,
                    changes: Vec::new(),
                })
                .collect(),
            events: Vec::new(),
            seq: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + MS(ms)
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// xorshift64*: deterministic losses for `Link::Flaky`.
    fn lost(&mut self, link: Link) -> bool {
        match link {
            Link::Up => false,
            Link::Down => true,
            Link::AnswersLost => false,
            Link::Flaky(percent) => {
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
                r % 100 < u64::from(percent)
            }
        }
    }

    fn push(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.events.push((at, self.seq, event));
    }

    /// Runs until the virtual time `until` (in ms from the start).
    fn run_until(&mut self, until_ms: u64) {
        let until = self.at(until_ms);
        loop {
            self.send_requests();
            let next_event = self.events.iter().map(|(t, s, _)| (*t, *s)).min();
            let next_timer = self
                .replicas
                .iter()
                .filter(|r| r.alive)
                .filter_map(|r| r.elector.poll_timeout().map(|(t, _)| t))
                .min();
            let next = match (next_event.map(|(t, _)| t), next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(until),
            }
            .max(self.now);
            if next > until {
                self.now = until;
                self.timers();
                return;
            }
            self.now = next;
            if let Some((t, s)) = next_event
                && t <= self.now
            {
                let i = self
                    .events
                    .iter()
                    .position(|(et, es, _)| (*et, *es) == (t, s))
                    .unwrap();
                let (_, _, event) = self.events.remove(i);
                self.deliver(event);
            }
            self.timers();
        }
    }

    fn send_requests(&mut self) {
        for i in 0..self.replicas.len() {
            if !self.replicas[i].alive {
                continue;
            }
            let wall = format!("t+{}ms", self.elapsed().as_millis());
            while let Some(req) = self.replicas[i].elector.poll_request(self.now, &wall) {
                let link = self.replicas[i].link;
                if !self.lost(link) {
                    let at = self.now + self.rtt / 2;
                    self.push(
                        at,
                        Event::Commit {
                            replica: i,
                            id: req.id,
                            op: req.op,
                        },
                    );
                }
            }
        }
    }

    fn deliver(&mut self, event: Event) {
        match event {
            Event::Commit { replica, id, op } => {
                let outcome = self.store.apply(&op);
                let link = self.replicas[replica].link;
                let lost = link == Link::AnswersLost || self.lost(link);
                if !lost {
                    let at = self.now + self.rtt / 2;
                    self.push(
                        at,
                        Event::Answer {
                            replica,
                            id,
                            outcome,
                        },
                    );
                }
            }
            Event::Answer {
                replica,
                id,
                outcome,
            } => {
                let r = &mut self.replicas[replica];
                // A link that went down while the answer travelled loses it.
                if r.alive && r.link != Link::Down {
                    r.elector.handle(self.now, id, outcome);
                }
            }
        }
    }

    fn timers(&mut self) {
        for i in 0..self.replicas.len() {
            if self.replicas[i].alive {
                self.replicas[i].elector.handle_timeout(self.now);
                if self.replicas[i].elector.is_finished() {
                    self.replicas[i].alive = false;
                }
            }
            while let Some(role) = self.replicas[i].elector.poll_role() {
                self.role_changed(i, role);
            }
        }
    }

    fn role_changed(&mut self, i: usize, role: Role) {
        let now = self.now;
        let elapsed = self.elapsed();
        self.replicas[i].changes.push((elapsed, role));
        if role.is_active() {
            self.check_safety(i);
            self.replicas[i].active_since = Some(now);
        } else if self.replicas[i].active_since.take().is_some() {
            self.replicas[i].stopped_at = Some(now);
        }
    }

    /// Replica `i` is becoming active now: nobody else is, and whoever was
    /// before stopped early enough.
    fn check_safety(&self, i: usize) {
        let margin = self.timing.lease_duration - self.timing.renew_deadline;
        for (j, other) in self.replicas.iter().enumerate() {
            if j == i {
                continue;
            }
            assert!(
                other.active_since.is_none(),
                "at {:?}: gw-{i} becomes active while gw-{j} is active",
                self.elapsed()
            );
            if let Some(stopped) = other.stopped_at {
                let gap = self.now - stopped;
                if other.released {
                    assert!(
                        !gap.is_zero(),
                        "gw-{i} active in the instant gw-{j} released"
                    );
                } else {
                    assert!(
                        gap >= margin,
                        "at {:?}: gw-{i} becomes active {gap:?} after gw-{j} stepped down, \
                         less than lease_duration - renew_deadline = {margin:?}",
                        self.elapsed()
                    );
                }
            }
        }
    }

    fn active(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].active_since.is_some())
            .collect()
    }

    fn only_active(&self) -> usize {
        let active = self.active();
        assert_eq!(
            active.len(),
            1,
            "at {:?}: expected exactly one active replica, got {active:?}",
            self.elapsed()
        );
        active[0]
    }

    /// Runs until some replica other than `not` is active; returns it and
    /// the virtual time in ms, or panics past `limit_ms`.
    fn run_until_active(&mut self, not: Option<usize>, limit_ms: u64, case: &str) -> (usize, u64) {
        let mut t = self.elapsed().as_millis() as u64;
        while t <= limit_ms {
            if let Some(&i) = self.active().iter().find(|&&i| Some(i) != not) {
                return (i, t);
            }
            t += 1;
            self.run_until(t);
        }
        panic!(
            "{case}: no replica other than {not:?} became active by {limit_ms} ms; changes: {:?}",
            self.replicas.iter().map(|r| &r.changes).collect::<Vec<_>>()
        );
    }

    /// The process stops at once: no release, no more requests.
    fn crash(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.alive = false;
        if r.active_since.take().is_some() {
            r.stopped_at = Some(self.now);
        }
    }

    fn release(&mut self, i: usize) {
        self.replicas[i].released = true;
        self.replicas[i].elector.release(self.now);
        self.timers();
    }

    fn role_changes(&self, i: usize) -> usize {
        self.replicas[i].changes.len()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[test]
fn one_replica_creates_the_lease_and_is_active_in_term_0() {
    let mut w = World::new(1, Timing::default(), MS(10));
    w.run_until(20);
    assert_eq!(w.only_active(), 0);
    assert_eq!(w.replicas[0].elector.role(), Role::Active { term: 0 });
    let (spec, _) = w.store.lease.clone().unwrap();
    assert_eq!(spec.holder.as_deref(), Some("gw-0"));
    assert_eq!(spec.lease_duration_seconds, Some(2));
    // GET (404), POST: two requests, active after the second answer.
    assert_eq!(w.replicas[0].changes, [(MS(20), Role::Active { term: 0 })]);
    // It then renews once per retry period, and stays active.
    let before = w.store.writes;
    w.run_until(10_020);
    assert_eq!(w.store.writes - before, 20);
    assert_eq!(w.role_changes(0), 1);
}

#[test]
fn of_replicas_started_together_exactly_one_is_active_and_stays_so() {
    for n in [2, 3] {
        for rtt in [MS(0), MS(10), MS(300)] {
            let mut w = World::new(n, Timing::default(), rtt);
            w.run_until(60_000);
            let leader = w.only_active();
            for i in 0..n {
                let expected = usize::from(i == leader);
                assert_eq!(w.role_changes(i), expected, "n={n} rtt={rtt:?} gw-{i}");
            }
            assert_eq!(w.store.holder(), Some(format!("gw-{leader}")));
        }
    }
}

/// How the active replica goes away in the failover table.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// Its process dies.
    Crash,
    /// It is cut off from the API server (and keeps running).
    Partition,
    /// Its writes reach the API server, the answers never come back.
    AnswersLost,
    /// It stops cleanly and releases the Lease.
    Release,
}

#[test]
fn failover_table_every_failure_replica_count_and_latency() {
    // The default timing, and the fastest the docs offer (1 s / 700 ms /
    // 200 ms), with round trips below their request timeouts.
    let fast = Timing::new(MS(1_000), MS(700), MS(200));
    let timings = [
        (Timing::default(), &[0, 10, 100, 300][..]),
        (fast, &[0, 10, 100][..]),
    ];
    for failure in [
        Failure::Crash,
        Failure::Partition,
        Failure::AnswersLost,
        Failure::Release,
    ] {
        for n in [2, 3] {
            for &(timing, rtts) in &timings {
                let (lease, retry) = (ms(timing.lease_duration), ms(timing.retry_period));
                for &rtt in rtts {
                    let mut w = World::new(n, timing, MS(rtt));
                    // A failure at several phases of the renewal cycle.
                    for offset in [0, 130, 260, 499] {
                        let case = format!(
                            "{failure:?} n={n} lease={lease}ms rtt={rtt}ms offset={offset}ms"
                        );
                        let fail_at = ms(w.elapsed()) + 3_000 + offset;
                        w.run_until(fail_at);
                        let old = w.only_active();
                        let old_term = match w.replicas[old].elector.role() {
                            Role::Active { term } => term,
                            Role::Standby => unreachable!(),
                        };
                        match failure {
                            Failure::Crash => w.crash(old),
                            Failure::Partition => w.replicas[old].link = Link::Down,
                            Failure::AnswersLost => w.replicas[old].link = Link::AnswersLost,
                            Failure::Release => w.release(old),
                        }
                        // The bound on how long the others wait.
                        let bound = match failure {
                            // A renewal in flight is answered first.
                            Failure::Release => retry + 4 * rtt,
                            Failure::Crash | Failure::Partition => lease + retry + 3 * rtt,
                            // Its first unanswered renewal may still commit.
                            Failure::AnswersLost => lease + 2 * retry + 3 * rtt,
                        };
                        let (new, t) = w.run_until_active(Some(old), fail_at + bound, &case);
                        assert_ne!(new, old, "{case}");
                        assert!(
                            !w.active().contains(&old),
                            "{case}: the old active replica still acts as active"
                        );
                        assert_eq!(
                            w.replicas[new].elector.role(),
                            Role::Active { term: old_term + 1 },
                            "{case}: a takeover is a new term"
                        );
                        let taken = t - fail_at;
                        assert!(taken <= bound, "{case}: took {taken} ms");
                        // The default timing meets the 3 s failover goal (with a
                        // round trip up to 100 ms to the API server) when the
                        // active replica dies, is cut off or stops. When only
                        // its answers are lost, its next renewal still lands
                        // and the bound is a retry period longer (3.0 s + rtt).
                        if timing == Timing::default()
                            && rtt <= 100
                            && !matches!(failure, Failure::AnswersLost)
                        {
                            assert!(taken <= 3_000, "{case}: took {taken} ms");
                        }
                        // The old replica comes back (a restart, the network
                        // heals): it joins as a standby and takes nothing.
                        w.run_until(t + 1_000);
                        let back = &mut w.replicas[old];
                        back.link = Link::Up;
                        back.released = false;
                        if !back.alive {
                            back.alive = true;
                            back.elector = Elector::new(format!("gw-{old}"), timing, w.now);
                        }
                        let changes = w.role_changes(old);
                        w.run_until(t + 5_000);
                        assert_eq!(w.only_active(), new, "{case}");
                        assert_eq!(w.role_changes(old), changes, "{case}: no flapping");
                    }
                }
            }
        }
    }
}

#[test]
fn a_partitioned_active_replica_steps_down_at_its_renew_deadline() {
    let timing = Timing::default();
    let mut w = World::new(2, timing, MS(10));
    w.run_until(3_000);
    let old = w.only_active();
    w.replicas[old].link = Link::Down;
    w.run_until(10_000);
    let (stepped_down, role) = *w.replicas[old].changes.last().unwrap();
    assert_eq!(role, Role::Standby);
    // Its last successful renewal was sent at most one retry period
    // before the partition, and it steps down renew_deadline after it.
    assert!(stepped_down <= MS(3_000) + timing.renew_deadline);
    assert!(stepped_down > MS(3_000) + timing.renew_deadline - timing.retry_period);
    // And the other took over no earlier than lease - deadline later
    // (check_safety asserts this on every step; here, the number).
    let (took_over, _) = w.replicas[1 - old].changes[0];
    assert!(took_over >= stepped_down + (timing.lease_duration - timing.renew_deadline));
    // While cut off, it never became active again.
    assert_eq!(w.role_changes(old), 2);
}

#[test]
fn the_api_server_down_for_everyone_means_nobody_active_then_exactly_one() {
    let timing = Timing::default();
    let mut w = World::new(3, timing, MS(10));
    w.run_until(4_000);
    let old = w.only_active();
    for r in &mut w.replicas {
        r.link = Link::Down;
    }
    w.run_until(4_000 + ms(timing.renew_deadline));
    assert_eq!(w.active(), Vec::<usize>::new(), "the holder stepped down");
    w.run_until(12_000);
    assert_eq!(w.active(), Vec::<usize>::new(), "nobody took over blind");
    for r in &mut w.replicas {
        r.link = Link::Up;
    }
    let (_, t) = w.run_until_active(None, 12_000 + ms(timing.retry_period) + 30, "heal");
    assert!(t >= 12_000);
    w.run_until(20_000);
    let now_active = w.only_active();
    // Whoever won (the old holder renewing, or a standby taking the
    // expired Lease), it won once.
    assert!(w.role_changes(now_active) <= 3, "{old} → {now_active}");
}

#[test]
fn a_lease_is_judged_by_when_it_was_seen_to_change_not_by_its_timestamps() {
    // A Lease whose renewTime is far in the past (another node's clock is
    // behind, or ours ahead) but whose holder keeps renewing must not be
    // taken; one that stops changing is taken lease_duration after it was
    // last seen to change, whatever its timestamps say.
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut e = Elector::new("gw-b", timing, t0);
    let lease = |rv: &str| Lease {
        spec: LeaseSpec {
            holder: Some("gw-a".into()),
            lease_duration_seconds: Some(2),
            acquire_time: Some("1970-01-01T00:00:00.000000Z".into()),
            renew_time: Some("1970-01-01T00:00:00.000000Z".into()),
            transitions: 4,
        },
        resource_version: rv.into(),
    };
    let mut now = t0;
    let mut rv = 10;
    let mut last_change = t0;
    // gw-a renews every 500 ms for 10 s: every read sees a new version.
    while now < t0 + MS(10_000) {
        let req = e.poll_request(now, "wall").unwrap();
        assert_eq!(req.op, Op::Get, "at {:?}", now - t0);
        rv += 1;
        last_change = now + MS(5);
        e.handle(last_change, req.id, Outcome::Found(lease(&rv.to_string())));
        assert_eq!(e.poll_request(last_change, "wall"), None);
        now = e.poll_timeout().unwrap().0;
    }
    // Then it stops renewing: the same version from now on.
    loop {
        let Some(req) = e.poll_request(now, "wall") else {
            now = e.poll_timeout().unwrap().0;
            continue;
        };
        match req.op {
            Op::Get => e.handle(now + MS(5), req.id, Outcome::Found(lease(&rv.to_string()))),
            Op::Update { spec, .. } => {
                assert_eq!(now, last_change + timing.lease_duration);
                assert_eq!(spec.holder.as_deref(), Some("gw-b"));
                assert_eq!(spec.transitions, 5);
                break;
            }
            Op::Create(_) => panic!("the Lease exists"),
        }
        now = e.poll_timeout().unwrap().0;
    }
}

#[test]
fn a_hung_request_is_given_up_and_its_late_answer_ignored() {
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut e = Elector::new("gw-a", timing, t0);
    let get = e.poll_request(t0, "wall").unwrap();
    assert_eq!(
        e.poll_timeout(),
        Some((t0 + timing.request_timeout, Wake::RequestTimeout))
    );
    e.handle_timeout(t0 + timing.request_timeout);
    // The next try is one retry period after the first was sent.
    assert_eq!(
        e.poll_timeout(),
        Some((t0 + timing.retry_period, Wake::Request))
    );
    let retry = e.poll_request(t0 + timing.retry_period, "wall").unwrap();
    assert_ne!(retry.id, get.id);
    // The first answer arrives late: ignored, the second still counts.
    e.handle(t0 + MS(510), get.id, Outcome::NotFound);
    assert!(
        e.poll_request(t0 + MS(510), "wall").is_none(),
        "still waiting"
    );
    e.handle(t0 + MS(520), retry.id, Outcome::NotFound);
    let create = e.poll_request(t0 + MS(520), "wall").unwrap();
    assert!(matches!(create.op, Op::Create(_)));
    e.handle(
        t0 + MS(530),
        create.id,
        Outcome::Written(Lease {
            spec: LeaseSpec {
                holder: Some("gw-a".into()),
                transitions: 0,
                ..LeaseSpec::default()
            },
            resource_version: "1".into(),
        }),
    );
    assert_eq!(e.poll_role(), Some(Role::Active { term: 0 }));
}

#[test]
fn an_answer_after_the_renew_deadline_confirms_nothing() {
    let timing = Timing {
        request_timeout: Duration::from_secs(5),
        ..Timing::default()
    };
    let t0 = Instant::now();
    let mut e = Elector::new("gw-a", timing, t0);
    let get = e.poll_request(t0, "wall").unwrap();
    e.handle(t0, get.id, Outcome::NotFound);
    let create = e.poll_request(t0, "wall").unwrap();
    let late = t0 + timing.renew_deadline;
    let written = Lease {
        spec: LeaseSpec {
            holder: Some("gw-a".into()),
            ..LeaseSpec::default()
        },
        resource_version: "1".into(),
    };
    e.handle(late, create.id, Outcome::Written(written));
    assert_eq!(e.role(), Role::Standby);
    assert_eq!(e.poll_role(), None);
    // Its next renewal, answered in time, makes it active.
    let renew = e
        .poll_request(t0 + timing.retry_period.max(late - t0), "wall")
        .unwrap();
    assert!(matches!(renew.op, Op::Update { .. }));
}

#[test]
fn a_conflicting_acquisition_loses_and_reads_again() {
    // Both saw the Lease expire and write with the same version: the store
    // takes one, the other gets 409, reads, and stays standby.
    let mut w = World::new(2, Timing::default(), MS(10));
    w.run_until(3_000);
    let old = w.only_active();
    w.crash(old);
    // A third replica that has seen the same Lease as the survivor.
    w.replicas.push(Replica {
        elector: Elector::new("gw-x", Timing::default(), w.now),
        link: Link::Up,
        alive: true,
        active_since: None,
        stopped_at: None,
        released: false,
        changes: Vec::new(),
    });
    w.run_until(10_000);
    let new = w.only_active();
    assert_ne!(new, old);
    for i in 0..3 {
        if i != new && i != old {
            assert_eq!(w.role_changes(i), 0, "gw-{i} never became active");
        }
    }
}

#[test]
fn renewals_that_fail_one_in_two_keep_the_active_replica_active() {
    // A failed renewal is retried in a retry period; with renew_deadline
    // over 2 retry periods, one success in two is enough.
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut e = Elector::new("gw-a", timing, t0);
    let mut store = SimulatedStore::default();
    let mut now = t0;
    let mut n = 0;
    while now < t0 + MS(60_000) {
        if let Some(req) = e.poll_request(now, "wall") {
            n += 1;
            let writes = matches!(req.op, Op::Update { .. });
            let outcome = if writes && n % 2 == 0 {
                Outcome::Failed("simulated 503".into())
            } else {
                store.apply(&req.op)
            };
            e.handle(now + MS(20), req.id, outcome);
        }
        now = e.poll_timeout().unwrap().0.max(now + MS(20));
    }
    assert_eq!(e.poll_role(), Some(Role::Active { term: 0 }));
    assert_eq!(e.poll_role(), None, "never stepped down");
}

#[test]
fn flapping_is_bounded_on_a_lossy_link() {
    // Each request and answer of the first active replica is lost with
    // 30 % or 60 %: it may step down and come back, but each tenure lasts
    // at least renew_deadline minus a round trip, and the invariant holds.
    let timing = Timing::default();
    for percent in [30, 60] {
        let rtt = MS(20);
        let mut w = World::new(3, timing, rtt);
        w.run_until(2_000);
        let flaky = w.only_active();
        w.replicas[flaky].link = Link::Flaky(percent);
        let seconds = 120;
        w.run_until(2_000 + seconds * 1_000);
        let min_tenure = timing.renew_deadline - rtt;
        let bound = 2 * (seconds * 1_000 / ms(min_tenure) + 1) as usize;
        let total: usize = (0..3).map(|i| w.role_changes(i)).sum();
        assert!(total <= bound, "{percent}%: {total} role changes");
        // Tenures are never shorter than that, except the last, cut short
        // by the end of the run.
        for r in &w.replicas {
            for pair in r.changes.windows(2) {
                if let [(start, Role::Active { .. }), (end, Role::Standby)] = pair {
                    assert!(*end - *start >= min_tenure, "{percent}%: {pair:?}");
                }
            }
        }
        assert!(w.active().len() <= 1);
    }
}

#[test]
fn releasing_without_holding_the_lease_writes_nothing() {
    let t0 = Instant::now();
    let mut e = Elector::new("gw-b", Timing::default(), t0);
    let get = e.poll_request(t0, "w").unwrap();
    let held = Lease {
        spec: LeaseSpec {
            holder: Some("gw-a".into()),
            lease_duration_seconds: Some(2),
            ..LeaseSpec::default()
        },
        resource_version: "7".into(),
    };
    e.handle(t0 + MS(5), get.id, Outcome::Found(held));
    e.release(t0 + MS(10));
    assert_eq!(e.poll_request(t0 + MS(10), "w"), None);
    assert!(e.is_finished());
    assert_eq!(e.poll_role(), None, "it was never active");
}

#[test]
fn a_release_clears_the_holder_after_going_standby() {
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut e = Elector::new("gw-a", timing, t0);
    let mut store = SimulatedStore::default();
    for _ in 0..2 {
        let req = e.poll_request(t0, "w0").unwrap();
        let outcome = store.apply(&req.op);
        e.handle(t0, req.id, outcome);
    }
    assert_eq!(e.poll_role(), Some(Role::Active { term: 0 }));
    e.release(t0 + MS(100));
    assert_eq!(
        e.poll_role(),
        Some(Role::Standby),
        "standby before the write"
    );
    let req = e.poll_request(t0 + MS(100), "w1").unwrap();
    let Op::Update { spec, .. } = &req.op else {
        panic!("{req:?}")
    };
    assert_eq!(spec.holder, None);
    assert_eq!(spec.transitions, 0);
    let outcome = store.apply(&req.op);
    e.handle(t0 + MS(110), req.id, outcome);
    assert!(e.is_finished());
    assert_eq!(e.poll_timeout(), None);
    assert_eq!(store.holder(), None);
}

#[test]
fn a_release_that_cannot_be_written_gives_up_after_the_renew_deadline() {
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut e = Elector::new("gw-a", timing, t0);
    let mut store = SimulatedStore::default();
    for _ in 0..2 {
        let req = e.poll_request(t0, "w").unwrap();
        let outcome = store.apply(&req.op);
        e.handle(t0, req.id, outcome);
    }
    e.release(t0);
    let mut now = t0;
    let mut attempts = 0;
    while !e.is_finished() {
        if let Some(req) = e.poll_request(now, "w") {
            attempts += 1;
            e.handle(
                now + MS(10),
                req.id,
                Outcome::Failed("simulated: no route".into()),
            );
        }
        now = e.poll_timeout().unwrap().0.max(now + MS(10));
        e.handle_timeout(now);
    }
    assert!(now <= t0 + timing.renew_deadline + MS(10));
    assert_eq!(attempts, 3, "once per retry period");
}

#[test]
fn timing_problems_name_each_setting_at_fault() {
    assert_eq!(Timing::default().problems(), Vec::<String>::new());
    let ok_fast = Timing::new(MS(1_000), MS(700), MS(200));
    assert_eq!(ok_fast.problems(), Vec::<String>::new());
    let cases: [(Timing, &[&str]); 5] = [
        (
            Timing::new(MS(1_500), MS(1_000), MS(300)),
            &["lease_duration_ms = 1500"],
        ),
        (
            Timing::new(MS(2_000), MS(2_000), MS(500)),
            &["renew_deadline_ms = 2000 must be less than lease_duration_ms"],
        ),
        (
            Timing::new(MS(2_000), MS(1_500), MS(50)),
            &["retry_period_ms = 50"],
        ),
        (
            Timing::new(MS(2_000), MS(600), MS(500)),
            &["more than 1.2 × retry_period_ms = 500"],
        ),
        (
            Timing::new(MS(500), MS(600), MS(500)),
            &[
                "lease_duration_ms = 500",
                "renew_deadline_ms = 600 must be less than",
                "more than 1.2",
            ],
        ),
    ];
    for (timing, expected) in cases {
        let problems = timing.problems();
        assert_eq!(problems.len(), expected.len(), "{problems:?}");
        for (p, e) in problems.iter().zip(expected) {
            assert!(p.contains(e), "{p:?} should contain {e:?}");
        }
    }
}
