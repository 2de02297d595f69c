//! The request fields that ask for structured output, as OpenAI and vLLM spell them:
//! `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` (`json`,
//! `regex`, `choice`, `grammar`, `json_object`) and its older `guided_json`, `guided_regex`,
//! `guided_choice` and `guided_grammar`. One request names at most one of them.

use super::Constraint;
use serde_json::Value;

/// A field that is wrong: its name (dotted into objects) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> FieldError {
    FieldError { param: param.to_string(), message: format!("{param}: {}", message.into()) }
}

/// The fields this module reads, in the order they are looked at.
pub const FIELDS: &[&str] =
    &["response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"];

/// The constraint `body` asks for, with the field that named it; `None` when it asks for none
/// (or for `response_format: {"type": "text"}`). vLLM's `guided_decoding_backend` and
/// `guided_whitespace_pattern` change nothing here and are not read.
pub fn constraint(body: &Value) -> Result<Option<(Constraint, &'static str)>, FieldError> {
    let mut found: Option<(Constraint, &'static str)> = None;
    for &name in FIELDS {
        let v = match body.get(name) {
            None | Some(Value::Null) => continue,
            Some(v) => v,
        };
        let c = match name {
            "response_format" => response_format(v)?,
            "structured_outputs" => Some(structured_outputs(v)?),
            "guided_json" => Some(json_schema(v, name)?),
            "guided_regex" => Some(Constraint::Regex(string(v, name)?)),
            "guided_choice" => Some(Constraint::Choice(choices(v, name)?)),
            "guided_grammar" => Some(Constraint::Grammar(string(v, name)?)),
            _ => unreachable!("FIELDS lists {name}"),
        };
        if let Some(c) = c {
            if let Some((_, first)) = &found {
                return Err(bad(name, format!("{first} already asks for structured output; give only one of them")));
            }
            found = Some((c, name));
        }
    }
    Ok(found)
}

fn string(v: &Value, param: &str) -> Result<String, FieldError> {
    v.as_str().map(str::to_string).ok_or_else(|| bad(param, "must be a string"))
}

fn choices(v: &Value, param: &str) -> Result<Vec<String>, FieldError> {
    let items = v.as_array().ok_or_else(|| bad(param, "must be a list of strings"))?;
    if items.is_empty() {
        return Err(bad(param, "the list of choices is empty"));
    }
    items
        .iter()
        .map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad(param, "must be a list of strings")))
        .collect()
}

/// A JSON schema given as an object, or as JSON text (vLLM takes both).
fn json_schema(v: &Value, param: &str) -> Result<Constraint, FieldError> {
    let schema = match v {
        Value::Object(_) | Value::Bool(_) => v.clone(),
        Value::String(s) => {
            serde_json::from_str(s).map_err(|e| bad(param, format!("the schema is not valid JSON: {e}")))?
        }
        _ => return Err(bad(param, "must be a JSON schema (an object, or JSON text)")),
    };
    Ok(Constraint::JsonSchema(schema))
}

fn response_format(v: &Value) -> Result<Option<Constraint>, FieldError> {
    let p = "response_format";
    let obj = v.as_object().ok_or_else(|| bad(p, "must be an object with a \"type\""))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let js = obj.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                bad("response_format.json_schema", "is required (an object with \"name\" and \"schema\")")
            })?;
            match js.get("schema") {
                None | Some(Value::Null) => Err(bad("response_format.json_schema.schema", "is required")),
                Some(s) => json_schema(s, "response_format.json_schema.schema").map(Some),
            }
        }
        Some(other) => Err(bad(
            "response_format.type",
            format!("{other:?} is not supported: use \"text\", \"json_object\" or \"json_schema\""),
        )),
        None => Err(bad("response_format.type", "is required")),
    }
}

fn structured_outputs(v: &Value) -> Result<Constraint, FieldError> {
    let p = "structured_outputs";
    let obj = v.as_object().ok_or_else(|| bad(p, "must be an object"))?;
    let mut found: Option<(Constraint, String)> = None;
    let mut compact = false;
    for (k, x) in obj {
        if x.is_null() {
            continue;
        }
        let param = format!("{p}.{k}");
        let c = match k.as_str() {
            "json" => json_schema(x, &param)?,
            "regex" => Constraint::Regex(string(x, &param)?),
            "choice" => Constraint::Choice(choices(x, &param)?),
            "grammar" => Constraint::Grammar(string(x, &param)?),
            "json_object" => match x {
                Value::Bool(true) => Constraint::JsonObject,
                Value::Bool(false) => continue,
                _ => return Err(bad(&param, "must be true or false")),
            },
            // JSON with no whitespace between tokens (vLLM's option).
            "disable_any_whitespace" => {
                compact = x.as_bool().ok_or_else(|| bad(&param, "must be true or false"))?;
                continue;
            }
            // Options that change nothing with llguidance.
            "disable_fallback" | "disable_additional_properties" | "whitespace_pattern" => continue,
            other => {
                return Err(bad(
                    &param,
                    format!("{other:?} is not supported: give one of json, regex, choice, grammar, json_object"),
                ))
            }
        };
        if let Some((_, first)) = &found {
            return Err(bad(&param, format!("{first} is already given; give only one kind of constraint")));
        }
        found = Some((c, param));
    }
    let c = found
        .map(|f| f.0)
        .ok_or_else(|| bad(p, "names no constraint: give one of json, regex, choice, grammar, json_object"))?;
    Ok(match c {
        Constraint::JsonObject if compact => compact_json(serde_json::json!({"type": "object"})),
        Constraint::JsonSchema(s) if compact => compact_json(s),
        other => other,
    })
}

/// A JSON schema whose output has no whitespace between tokens (llguidance's option).
fn compact_json(mut schema: Value) -> Constraint {
    if let Some(opts) = super::guidance_options(&mut schema) {
        opts.insert("whitespace_flexible".into(), Value::Bool(false));
    }
    Constraint::JsonSchema(schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(v: Value) -> Result<Option<(Constraint, &'static str)>, FieldError> {
        constraint(&v)
    }

    #[test]
    fn every_spelling_names_its_constraint() {
        let s = json!({"type": "object"});
        assert_eq!(c(json!({})).unwrap(), None);
        assert_eq!(c(json!({"response_format": {"type": "text"}})).unwrap(), None);
        assert_eq!(
            c(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some((Constraint::JsonObject, "response_format"))
        );
        assert_eq!(
            c(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}}))
                .unwrap()
                .unwrap()
                .0,
            Constraint::JsonSchema(s.clone())
        );
        assert_eq!(
            c(json!({"structured_outputs": {"regex": "a+"}})).unwrap().unwrap().0,
            Constraint::Regex("a+".into())
        );
        assert_eq!(
            c(json!({"structured_outputs": {"choice": ["a", "b"]}})).unwrap().unwrap().0,
            Constraint::Choice(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            c(json!({"structured_outputs": {"json": "{\"type\":\"object\"}"}})).unwrap().unwrap().0,
            Constraint::JsonSchema(s.clone())
        );
        assert_eq!(c(json!({"guided_json": s})).unwrap().unwrap().1, "guided_json");
        assert_eq!(
            c(json!({"guided_grammar": "start: \"a\""})).unwrap().unwrap().0,
            Constraint::Grammar("start: \"a\"".into())
        );
        assert_eq!(
            c(json!({"guided_choice": ["x"], "guided_decoding_backend": "xgrammar"})).unwrap().unwrap().1,
            "guided_choice"
        );
    }

    #[test]
    fn compact_json_is_an_llguidance_option() {
        let c =
            c(json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": true}})).unwrap().unwrap().0;
        assert_eq!(c, Constraint::JsonSchema(json!({"type": "object", "x-guidance": {"whitespace_flexible": false}})));
    }

    #[test]
    fn bad_fields_are_named() {
        let e = |v: Value| c(v).unwrap_err();
        assert_eq!(e(json!({"response_format": {"type": "yaml"}})).param, "response_format.type");
        assert_eq!(e(json!({"response_format": {"type": "json_schema"}})).param, "response_format.json_schema");
        assert_eq!(
            e(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})).param,
            "response_format.json_schema.schema"
        );
        assert_eq!(e(json!({"guided_choice": []})).param, "guided_choice");
        assert_eq!(e(json!({"guided_regex": 3})).param, "guided_regex");
        assert_eq!(e(json!({"guided_json": "{nope"})).param, "guided_json");
        assert_eq!(
            e(json!({"structured_outputs": {"structural_tag": "x"}})).param,
            "structured_outputs.structural_tag"
        );
        assert_eq!(
            e(json!({"structured_outputs": {"regex": "a", "choice": ["a"]}})).param.split('.').next(),
            Some("structured_outputs")
        );
        assert_eq!(e(json!({"structured_outputs": {}})).param, "structured_outputs");
        let two = e(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}));
        assert_eq!(two.param, "guided_regex");
        assert!(two.message.contains("response_format"), "{}", two.message);
    }
}
