//! End to end through `load`: YAML text -> lower -> resolve -> the reference evaluator.
//! These check that resolution and evaluation agree with the language as users write it
//! (the unit tests in `resolve.rs` and `eval.rs` build values directly).

use fw_compiler::ast::Document;
use fw_compiler::ast::Expect;
use fw_compiler::diag::{Code, Diagnostic};
use fw_compiler::eval::evaluate;
use fw_compiler::model::{Decider, Verdict};
use fw_compiler::resolve::{PolicySet, resolve};
use fw_compiler::resolve::{flow_of_case, host_of_test};
use fw_compiler::source::{SourceFile, SourceMap};
use fw_compiler::yaml::ParseLimits;

/// What `load` does, spelled out so this test depends only on yaml, lower and resolve.
struct Loaded {
    sources: SourceMap,
    policy_set: Option<PolicySet>,
    diagnostics: Vec<Diagnostic>,
}

fn load_files(files: &[(&str, &str)]) -> Loaded {
    let mut sources = SourceMap::new();
    let mut documents: Vec<Document> = Vec::new();
    let mut diagnostics = Vec::new();
    for (name, text) in files {
        let file = sources.add(SourceFile::new(*name, *text));
        let nodes = fw_compiler::yaml::parse(file, text.as_bytes(), &ParseLimits::default())
            .expect("valid YAML");
        let (docs, diags) = fw_compiler::lower::lower(&nodes);
        documents.extend(docs);
        diagnostics.extend(diags);
    }
    let (policy_set, diags) = resolve(&documents, &sources);
    diagnostics.extend(diags);
    Loaded { sources, policy_set, diagnostics }
}

fn codes(diags: &[Diagnostic]) -> Vec<Code> {
    diags.iter().map(|d| d.code).collect()
}

const EXAMPLE: &str = r#"
apiVersion: fw/v1
kind: AddressSet
metadata: {name: office}
spec:
  addresses: [203.0.113.0/24, 2001:db8:100::/48, 198.51.100.7, {set: partners}]
  except: [203.0.113.99]
---
apiVersion: fw/v1
kind: AddressSet
metadata: {name: partners}
spec:
  addresses: [192.0.2.128/25]
---
apiVersion: fw/v1
kind: Policy
metadata: {name: web}
spec:
  hosts: {labels: {role: web}, names: ["web-*"]}
  mode: enforce
  defaults: {ingress: deny, egress: deny}
  ingress:
    - name: https
      action: allow
      from: [any]
      proto: tcp
      ports: [80, 443, 8000-8100]
    - {action: allow, proto: icmp, icmp: [echo-request]}
    - name: ssh
      action: allow
      from: [{set: office}]
      proto: tcp
      ports: [22]
  egress:
    - name: db
      action: allow
      to: [10.0.5.0/24]
      proto: tcp
      ports: [5432]
      workloads: [system.slice/app.service]
    - {name: untrusted, action: deny, workloads: [system.slice/app.service/untrusted]}
---
apiVersion: fw/v1
kind: Policy
metadata: {name: audit-ssh}
spec:
  mode: audit
  ingress:
    - {name: no-ssh, action: deny, proto: tcp, ports: [22]}
---
apiVersion: fw/v1
kind: PolicyTest
metadata: {name: web-tests}
spec:
  host: {name: web-1, labels: {role: web}}
  cases:
    - {direction: ingress, from: 198.51.100.9, proto: tcp, port: 443, expect: allow}
    - {direction: ingress, from: 198.51.100.9, proto: tcp, port: 22, expect: deny}
    - {direction: ingress, from: 192.0.2.200, proto: tcp, port: 22, expect: audit-deny}
    - {direction: ingress, from: 203.0.113.99, proto: tcp, port: 22, expect: deny}
    - {direction: egress, to: 10.0.5.3, proto: tcp, port: 5432, workload: system.slice/app.service, expect: allow}
    - {direction: egress, to: 10.0.5.3, proto: tcp, port: 5432, workload: system.slice/other.service, expect: deny}
    - {direction: egress, to: 10.0.5.3, proto: tcp, port: 5432, workload: system.slice/app.service/untrusted/x, expect: deny}
    - {direction: egress, to: 10.0.5.3, proto: tcp, port: 5432, workload: system.slice/app.service/worker, expect: allow}
    - {direction: ingress, from: 192.0.2.1, proto: icmp, icmp: echo-request, expect: allow}
    - {direction: ingress, from: 192.0.2.1, proto: icmp, icmp: 13, expect: deny}
"#;

#[test]
fn the_documented_example_passes_its_own_tests() {
    let loaded = load_files(&[("example.yaml", EXAMPLE)]);
    assert_eq!(codes(&loaded.diagnostics), vec![], "{:#?}", loaded.diagnostics);
    let set = loaded.policy_set.expect("no errors, so a policy set");
    assert_eq!(set.tests.len(), 1);
    let test = &set.tests[0];
    let policy = set.for_host(&host_of_test(test));
    assert_eq!(policy.policies, vec!["audit-ssh", "web"]);
    for (i, case) in test.cases.iter().enumerate() {
        let got = evaluate(&policy, &flow_of_case(case)).outcome.verdict;
        let want = match case.expect.value {
            Expect::Allow => Verdict::Allow,
            Expect::Deny => Verdict::Deny,
            Expect::AuditDeny => Verdict::AuditDeny,
        };
        assert_eq!(got, want, "case {i}: {case:?}");
    }
    // The audit-deny names the audit rule.
    let case = &test.cases[2];
    let outcome = evaluate(&policy, &flow_of_case(case)).outcome;
    let Decider::Rule(id) = outcome.decided_by else { panic!("{outcome:?}") };
    let rule = policy.rule(id).unwrap();
    assert_eq!((rule.policy.as_str(), rule.label().as_str()), ("audit-ssh", "no-ssh"));
    assert_eq!(&*rule.location.file, "example.yaml");

    // A host the web policy does not select gets only the audit policy.
    let other = set.for_host(&fw_compiler::model::HostIdentity {
        name: "db-1".into(),
        labels: [("role".to_string(), "web".to_string())].into(),
    });
    assert_eq!(other.policies, vec!["audit-ssh"]);
}

#[test]
fn cross_file_problems_are_reported_together() {
    let a = r#"
apiVersion: fw/v1
kind: AddressSet
metadata: {name: a}
spec: {addresses: [{set: b}]}
---
apiVersion: fw/v1
kind: AddressSet
metadata: {name: dup}
spec: {addresses: [10.0.0.0/8]}
"#;
    let b = r#"
apiVersion: fw/v1
kind: AddressSet
metadata: {name: b}
spec: {addresses: [{set: a}]}
---
apiVersion: fw/v1
kind: AddressSet
metadata: {name: dup}
spec: {addresses: [10.0.0.0/8], except: [10.0.0.0/8]}
---
apiVersion: fw/v1
kind: Policy
metadata: {name: p}
spec:
  ingress:
    - {action: allow, from: [{set: dupp}]}
"#;
    let loaded = load_files(&[("a.yaml", a), ("b.yaml", b)]);
    assert!(loaded.policy_set.is_none());
    let mut got = codes(&loaded.diagnostics);
    got.sort();
    // The second `dup` is dropped, so its emptiness is not reported on top of the duplicate.
    assert_eq!(got, vec![Code::UnknownSet, Code::SetCycle, Code::DuplicateName]);
    let dup = loaded.diagnostics.iter().find(|d| d.code == Code::DuplicateName).unwrap();
    let record = dup.to_record(&loaded.sources);
    assert_eq!(record.file.as_deref(), Some("b.yaml"));
    assert_eq!(&*record.related[0].location.file, "a.yaml");
    let unknown = loaded.diagnostics.iter().find(|d| d.code == Code::UnknownSet).unwrap();
    assert_eq!(unknown.hint.as_deref(), Some("did you mean `dup`?"));
}
