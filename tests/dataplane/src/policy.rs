//! The tests' one-file policies: compiled for the test host (`web-1`, no labels), and a rule's
//! counter found by the rule's name, so frame tests can say which rule must count a frame.

use fw_compiler::compile::compile;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::{HostIdentity, HostPolicy};
use fw_compiler::yaml::ParseLimits;

use crate::probe::Count;

/// `yaml` as the file `p.yaml`, compiled for `web-1`; panics with the diagnostics when it does
/// not load or compile.
pub fn state(yaml: &str) -> MapState {
    compile(&host_policy(yaml), &Capacities::default()).expect("compiles")
}

/// `yaml` as the file `p.yaml`, resolved for `web-1` (what [`state`] compiles, and what the
/// reference evaluator takes); panics with the diagnostics when it does not load.
pub fn host_policy(yaml: &str) -> HostPolicy {
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "web-1".into(), ..HostIdentity::default() };
    set.for_host(&host)
}

/// The counter of the rule named `name` in `state`.
pub fn rule(state: &MapState, name: &str) -> Count {
    let id = state.rules.iter().find(|(_, r)| r.name.as_deref() == Some(name)).map(|(id, _)| id.0);
    Count::Rule(id.unwrap_or_else(|| panic!("no rule {name}")))
}
