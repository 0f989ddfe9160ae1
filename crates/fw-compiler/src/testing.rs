//! Running `PolicyTest` cases.
//!
//! Each case is decided twice: by the reference evaluator, and by the user-space model of the
//! compiled map lookup (`MapState::lookup`). A case passes only when both give the expected
//! verdict, so a policy test also checks the compiler on the user's own policies. Hosts are
//! compiled once per distinct identity.

use std::collections::BTreeMap;

use crate::ast::{Action, Direction, Expect, PolicyTest, TestCase};
use crate::diag::Diagnostic;
use crate::eval;
use crate::mapstate::{Capacities, MapState};
use crate::model::{Decider, HostIdentity, HostPolicy, Outcome, Verdict};
use crate::resolve::{self, PolicySet};
use crate::source::{Location, SourceMap};

/// The result of one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub test: String,
    /// Position of the case in the test's `cases`, from 0.
    pub index: usize,
    pub location: Location,
    pub direction: Direction,
    pub expect: Expect,
    /// The reference evaluator's outcome.
    pub evaluated: Outcome,
    /// The compiled lookup's outcome; `None` when the host's policy did not compile.
    pub compiled: Option<Outcome>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        let want = verdict_of(self.expect);
        self.evaluated.verdict == want && self.compiled.as_ref().is_some_and(|c| c.verdict == want)
    }
}

fn verdict_of(expect: Expect) -> Verdict {
    match expect {
        Expect::Allow => Verdict::Allow,
        Expect::Deny => Verdict::Deny,
        Expect::AuditDeny => Verdict::AuditDeny,
    }
}

/// All results, plus compile errors of hosts whose policy did not compile.
#[derive(Clone, Debug, Default)]
pub struct TestReport {
    pub cases: Vec<CaseResult>,
    pub compile_errors: Vec<Diagnostic>,
}

impl TestReport {
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }

    pub fn passed(&self) -> usize {
        self.cases.len() - self.failed()
    }
}

/// Runs every case of every `PolicyTest` in the set.
pub fn run(set: &PolicySet, sources: &SourceMap, caps: &Capacities) -> TestReport {
    let mut report = TestReport::default();
    let mut hosts: BTreeMap<HostIdentity, (HostPolicy, Option<MapState>)> = BTreeMap::new();
    for test in &set.tests {
        let host = resolve::host_of_test(test);
        let (policy, state) = hosts.entry(host.clone()).or_insert_with(|| {
            let policy = set.for_host(&host);
            let state = match crate::compile::compile(&policy, caps) {
                Ok(s) => Some(s),
                Err(errors) => {
                    report.compile_errors.extend(errors);
                    None
                }
            };
            (policy, state)
        });
        for (index, case) in test.cases.iter().enumerate() {
            report.cases.push(run_case(test, index, case, policy, state.as_ref(), sources));
        }
    }
    report
}

fn run_case(
    test: &PolicyTest,
    index: usize,
    case: &TestCase,
    policy: &HostPolicy,
    state: Option<&MapState>,
    sources: &SourceMap,
) -> CaseResult {
    let flow = resolve::flow_of_case(case);
    CaseResult {
        test: test.metadata.name.value.clone(),
        index,
        location: sources.location(case.span),
        direction: case.direction,
        expect: case.expect.value,
        evaluated: eval::evaluate(policy, &flow).outcome,
        compiled: state.map(|s| s.lookup(&flow)),
    }
}

/// A one-line description of what decided an outcome: `rule web/https (policies/web.yaml:12:7)`,
/// `the ingress default (deny, set by policy base)`.
pub fn describe_decider(policy: &HostPolicy, direction: Direction, outcome: &Outcome) -> String {
    match outcome.decided_by {
        Decider::Rule(id) => match policy.rule(id) {
            Some(r) => format!("rule {}/{} ({})", r.policy, r.label(), r.location),
            None => format!("rule id {}", id.0),
        },
        Decider::Default => {
            let d = policy.default_for(direction);
            let (action, by) = match outcome.verdict {
                Verdict::AuditDeny => (d.audit, d.audit_policy.as_deref()),
                _ => (d.verdict, d.verdict_policy.as_deref()),
            };
            match (action, by) {
                (Action::Deny, Some(p)) => {
                    format!("the {} default (deny, set by policy {p})", direction.as_str())
                }
                _ => format!("the {} default (allow: no policy sets deny)", direction.as_str()),
            }
        }
        Decider::Always(reason) => format!("always allowed ({reason:?})"),
    }
}
