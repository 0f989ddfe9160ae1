//! The small policies the traffic tests enforce, as YAML text: one policy `base` that denies
//! ingress but for a few allow rules, built in one place so a change of the language's syntax
//! is made once.

/// Policy `base`: ingress denied but for `rules`, each a flow-style rule mapping (one list
/// item).
pub fn ingress_allowing(rules: &[&str]) -> String {
    let mut out = String::from(concat!(
        "apiVersion: fw/v1\n",
        "kind: Policy\n",
        "metadata: {name: base}\n",
        "spec:\n",
        "  defaults: {ingress: deny}\n",
        "  ingress:\n",
    ));
    for rule in rules {
        out.push_str("    - ");
        out.push_str(rule);
        out.push('\n');
    }
    out
}

/// An allow rule `name` for `proto` to `port`.
pub fn allow_port(name: &str, proto: &str, port: u16) -> String {
    format!("{{name: {name}, action: allow, proto: {proto}, ports: [{port}]}}")
}

/// Pings allowed, TCP to `port` allowed, everything else denied.
pub fn ping_and_tcp(port: u16) -> String {
    ingress_allowing(&["{name: ping, action: allow, proto: icmp}", &allow_port("svc", "tcp", port)])
}

/// Only TCP to `port`: no ping.
pub fn only_tcp(port: u16) -> String {
    ingress_allowing(&[&allow_port("svc", "tcp", port)])
}
