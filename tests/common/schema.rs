//! A small JSON Schema validator for the keywords `schemas/*.schema.json` use (type, const, enum,
//! required, properties, additionalProperties, items, minItems, minimum, pattern `^[0-9a-f]{64}$`,
//! `$ref` into `$defs`). Any other keyword is refused, so a schema cannot silently go unchecked.

use serde_json::Value;

const ANNOTATIONS: &[&str] = &["$schema", "$id", "title", "description", "$defs"];

pub fn validate(root: &Value, instance: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(root, root, instance, "$", &mut errors);
    errors
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        other => panic!("unsupported type '{other}'"),
    }
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        panic!("schema at {at} is not an object")
    };
    for (key, rule) in schema {
        match key.as_str() {
            k if ANNOTATIONS.contains(&k) => {}
            "$ref" => {
                let name = rule
                    .as_str()
                    .unwrap()
                    .strip_prefix("#/$defs/")
                    .expect("only #/$defs/ refs");
                check(root, &root["$defs"][name], v, at, errors);
            }
            "type" => {
                let ok = match rule {
                    Value::String(t) => type_matches(t, v),
                    Value::Array(ts) => ts.iter().any(|t| type_matches(t.as_str().unwrap(), v)),
                    _ => panic!("bad type rule"),
                };
                if !ok {
                    errors.push(format!("{at}: expected type {rule}, got {v}"));
                }
            }
            "const" if v != rule => errors.push(format!("{at}: expected {rule}, got {v}")),
            "const" => {}
            "enum" if !rule.as_array().unwrap().contains(v) => {
                errors.push(format!("{at}: {v} not in {rule}"))
            }
            "enum" => {}
            "minimum" => {
                if let Some(x) = v.as_f64() {
                    if x < rule.as_f64().unwrap() {
                        errors.push(format!("{at}: {x} < {rule}"));
                    }
                }
            }
            "minItems" => {
                if let Some(a) = v.as_array() {
                    if (a.len() as u64) < rule.as_u64().unwrap() {
                        errors.push(format!("{at}: fewer than {rule} items"));
                    }
                }
            }
            "pattern" => {
                assert_eq!(rule, "^[0-9a-f]{64}$", "unsupported pattern");
                if let Some(s) = v.as_str() {
                    if s.len() != 64
                        || !s
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    {
                        errors.push(format!("{at}: '{s}' is not a sha256"));
                    }
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in rule.as_array().unwrap() {
                        if !o.contains_key(r.as_str().unwrap()) {
                            errors.push(format!("{at}: missing '{}'", r.as_str().unwrap()));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (name, sub) in rule.as_object().unwrap() {
                        if let Some(x) = o.get(name) {
                            check(root, sub, x, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(o) = v.as_object() {
                    let known = schema.get("properties").and_then(|p| p.as_object());
                    for (name, x) in o {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(false) => {
                                errors.push(format!("{at}: unexpected property '{name}'"))
                            }
                            Value::Bool(true) => {}
                            sub => check(root, sub, x, &format!("{at}.{name}"), errors),
                        }
                    }
                }
            }
            "items" => {
                if let Some(a) = v.as_array() {
                    for (i, x) in a.iter().enumerate() {
                        check(root, rule, x, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            other => {
                panic!("schema keyword '{other}' at {at} is not supported by the test validator")
            }
        }
    }
}
