//! The JSON Schema and the error-code docs stay in step with the code.
//!
//! - `schemas/fw-v1.schema.json` must equal `schema::json_schema()` (set `UPDATE_SCHEMA=1` to
//!   rewrite it).
//! - Every valid fixture must validate against the schema, and the invalid fixtures whose
//!   mistakes a schema can express must not. Full JSON Schema validators pull in dozens of
//!   crates (URL and IDNA handling, big numbers), so this file has a small validator for the
//!   keywords our generated schema uses; it panics on any other keyword, so a schema change
//!   cannot make the check silently pass.
//! - `docs/errors.md` has a section for every code in `Code::ALL`.

use std::path::{Path, PathBuf};

use fw_compiler::diag::Code;
use fw_compiler::schema::json_schema;
use fw_compiler::source::FileId;
use fw_compiler::yaml::{Node, NodeKind, ParseLimits, parse};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).expect("schema serializes");
    text.push('\n');
    text
}

#[test]
fn checked_in_schema_is_current() {
    let path = repo_root().join("schemas/fw-v1.schema.json");
    let generated = schema_text();
    if std::env::var_os("UPDATE_SCHEMA").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write schemas/fw-v1.schema.json");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schemas/fw-v1.schema.json is out of date with fw_compiler::schema::json_schema().\n\
         Regenerate it with\n    cargo run -p fwctl -- schema > schemas/fw-v1.schema.json\n\
         or\n    UPDATE_SCHEMA=1 cargo test -p fw-compiler --test schema"
    );
}

#[test]
fn schema_is_draft_2020_12_with_a_document_per_kind() {
    let schema = json_schema();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let kinds: Vec<&str> = schema["oneOf"]
        .as_array()
        .expect("oneOf over the kinds")
        .iter()
        .filter_map(|s| s["properties"]["kind"]["const"].as_str())
        .collect();
    assert_eq!(kinds, ["AddressSet", "Policy", "PolicyTest"]);
}

// ---- fixtures against the schema -------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn to_json(node: &Node) -> Value {
    match &node.kind {
        NodeKind::Null => Value::Null,
        NodeKind::Bool(b) => Value::Bool(*b),
        NodeKind::Int(i) => match i64::try_from(*i) {
            Ok(i) => Value::from(i),
            Err(_) => Value::from(*i as f64),
        },
        NodeKind::Float(f) => Value::from(*f),
        NodeKind::Str(s) => Value::from(s.clone()),
        NodeKind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = k.as_str().map_or_else(|| format!("{:?}", k.kind), str::to_string);
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

/// The documents of a fixture as JSON values; `None` if it does not parse as YAML.
fn documents(path: &Path) -> Option<Vec<Value>> {
    let bytes = std::fs::read(path).expect("readable fixture");
    let nodes = parse(FileId(0), &bytes, &ParseLimits::default()).ok()?;
    Some(nodes.iter().map(to_json).collect())
}

#[test]
fn valid_fixtures_validate_against_the_schema() {
    let schema = json_schema();
    let files = yaml_files(&fixtures().join("valid"));
    assert!(!files.is_empty());
    for path in files {
        for (i, doc) in documents(&path).expect("valid fixture parses").iter().enumerate() {
            let errors = validate(&schema, doc);
            assert!(errors.is_empty(), "{} document {i}: {errors:#?}", path.display());
        }
    }
}

#[test]
fn schema_rejects_the_mistakes_it_can_express() {
    let schema = json_schema();
    // Codes whose fixtures the schema must reject; the others (host bits, reversed ranges, bad
    // IPs that look like IPs, duplicate names, `.` in workloads) need `lower`.
    let expressible = [
        "fw003", "fw004", "fw005", "fw006", "fw007", "fw011", "fw013", "fw017", "fw022", "fw023",
        "fw024",
    ];
    for code in expressible {
        let path = yaml_files(&fixtures().join("invalid"))
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(code)))
            .unwrap_or_else(|| panic!("no fixture for {code}"));
        let docs = documents(&path).expect("fixture parses");
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                !validate(&schema, doc).is_empty(),
                "{} document {i} passes the schema",
                path.display()
            );
        }
    }
}

#[test]
fn the_validator_is_not_vacuous() {
    let schema = json_schema();
    let good = serde_json::json!({
        "apiVersion": "fw/v1", "kind": "AddressSet", "metadata": {"name": "a"},
        "spec": {"addresses": ["10.0.0.0/8", {"set": "b"}]}
    });
    assert_eq!(validate(&schema, &good), Vec::<String>::new());
    for bad in [
        serde_json::json!({}),
        serde_json::json!({"apiVersion": "fw/v1", "kind": "AddressSet", "metadata": {"name": "a"},
                           "spec": {"addresses": []}}),
        serde_json::json!({"apiVersion": "fw/v1", "kind": "AddressSet", "metadata": {"name": "a"},
                           "spec": {"addresses": ["any"]}}),
        serde_json::json!({"apiVersion": "fw/v1", "kind": "Policy", "metadata": {"name": "a"},
                           "spec": {"ingress": [{"action": "allow", "ports": [80]}]}}),
        serde_json::json!({"apiVersion": "fw/v1", "kind": "Policy", "metadata": {"name": "a b"},
                           "spec": {}}),
    ] {
        assert!(!validate(&schema, &bad).is_empty(), "{bad} passes");
    }
}

// ---- a small JSON Schema validator --------------------------------------------------------------

/// Validates `value` against `root`, returning one message per failure.
fn validate(root: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(root, root, value, "$", &mut errors);
    errors
}

fn check(root: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{at}: not allowed"));
            return;
        }
        Value::Object(s) => s,
        other => panic!("not a schema: {other}"),
    };
    for (keyword, arg) in schema {
        match keyword.as_str() {
            "$schema" | "$id" | "$defs" | "title" | "description" | "format" | "default" => {}
            "$ref" => {
                let name = arg
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/$defs/"))
                    .unwrap_or_else(|| panic!("unsupported $ref {arg}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "dangling $ref {name}");
                check(root, target, value, at, errors);
            }
            "type" => {
                let types: Vec<&str> = match arg {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => panic!("bad type {arg}"),
                };
                if !types.iter().any(|t| has_type(value, t)) {
                    errors.push(format!("{at}: expected {types:?}, found {value}"));
                }
            }
            "enum" => {
                let options = arg.as_array().expect("enum is a list");
                if !options.contains(value) {
                    errors.push(format!("{at}: {value} is not one of {arg}"));
                }
            }
            "const" => {
                if value != arg {
                    errors.push(format!("{at}: {value} is not {arg}"));
                }
            }
            "pattern" => {
                if let Value::String(s) = value {
                    let re = regex_lite::Regex::new(arg.as_str().expect("pattern is a string"))
                        .expect("pattern compiles");
                    if !re.is_match(s) {
                        errors.push(format!("{at}: {s:?} does not match {arg}"));
                    }
                }
            }
            "minLength" => {
                if let Value::String(s) = value
                    && (s.chars().count() as u64) < arg.as_u64().expect("count")
                {
                    errors.push(format!("{at}: shorter than {arg}"));
                }
            }
            "minimum" | "maximum" => {
                if let (Some(v), Some(limit)) = (value.as_f64(), arg.as_f64()) {
                    let ok = if keyword == "minimum" { v >= limit } else { v <= limit };
                    if !ok {
                        errors.push(format!("{at}: {v} is beyond the {keyword} {limit}"));
                    }
                }
            }
            "minItems" => {
                if let Value::Array(items) = value
                    && (items.len() as u64) < arg.as_u64().expect("count")
                {
                    errors.push(format!("{at}: fewer than {arg} items"));
                }
            }
            "items" => {
                if let Value::Array(items) = value {
                    for (i, item) in items.iter().enumerate() {
                        check(root, arg, item, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            "properties" => {
                if let Value::Object(map) = value {
                    for (name, sub) in arg.as_object().expect("properties") {
                        if let Some(v) = map.get(name) {
                            check(root, sub, v, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "required" => {
                if let Value::Object(map) = value {
                    for name in arg.as_array().expect("required").iter().filter_map(Value::as_str) {
                        if !map.contains_key(name) {
                            errors.push(format!("{at}: missing {name}"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Value::Object(map) = value {
                    let known = schema.get("properties").and_then(Value::as_object);
                    for (name, v) in map {
                        if !known.is_some_and(|k| k.contains_key(name)) {
                            check(root, arg, v, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "propertyNames" => {
                if let Value::Object(map) = value {
                    for name in map.keys() {
                        check(
                            root,
                            arg,
                            &Value::from(name.clone()),
                            &format!("{at}.{name}"),
                            errors,
                        );
                    }
                }
            }
            "allOf" => {
                for sub in arg.as_array().expect("allOf") {
                    check(root, sub, value, at, errors);
                }
            }
            "anyOf" | "oneOf" => {
                let passing = arg
                    .as_array()
                    .expect("a list of schemas")
                    .iter()
                    .filter(|sub| {
                        let mut e = Vec::new();
                        check(root, sub, value, at, &mut e);
                        e.is_empty()
                    })
                    .count();
                let ok = if keyword == "oneOf" { passing == 1 } else { passing >= 1 };
                if !ok {
                    errors.push(format!("{at}: {passing} of the {keyword} schemas match {value}"));
                }
            }
            "if" => {
                let mut e = Vec::new();
                check(root, arg, value, at, &mut e);
                let branch = if e.is_empty() { schema.get("then") } else { schema.get("else") };
                if let Some(branch) = branch {
                    check(root, branch, value, at, errors);
                }
            }
            "then" | "else" => {} // handled with "if"
            other => panic!("the test validator does not support the keyword {other:?}"),
        }
    }
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("unknown type {other}"),
    }
}

// ---- docs/errors.md -----------------------------------------------------------------------------

#[test]
fn errors_md_has_a_section_per_code() {
    let text = std::fs::read_to_string(repo_root().join("docs/errors.md")).expect("docs/errors.md");
    let headings: Vec<&str> = text.lines().filter(|l| l.starts_with("## ")).collect();
    for code in Code::ALL {
        let wanted = format!("## {}", code.as_str());
        let found =
            headings.iter().find(|h| h.split_whitespace().take(2).eq(wanted.split_whitespace()));
        assert!(found.is_some(), "docs/errors.md has no `{wanted}` section");
    }
    // Sections are in code order, so the page reads like the table it is.
    let codes: Vec<&str> = headings
        .iter()
        .filter_map(|h| h.split_whitespace().nth(1))
        .filter(|c| c.starts_with("FW"))
        .collect();
    let mut sorted = codes.clone();
    sorted.sort_unstable();
    assert_eq!(codes, sorted, "sections out of order");
}
