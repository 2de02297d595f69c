//! Chat tool calls in the Hermes format (Qwen 2.5/3, SmolLM3, Hermes): the model writes
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks, which the server
//! returns as OpenAI's `tool_calls`.
//!
//! `tool_choice`: `"none"` (tools are not shown to the model), `"auto"` (the model decides;
//! its blocks are parsed out of the text), `"required"` and a named function (the output is
//! constrained to tool-call blocks whose arguments match the tools' parameter schemas).

use super::Constraint;
use serde_json::{json, Value};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments object.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A parsed call: the function and its arguments as JSON text (OpenAI's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

fn bad(param: &str, msg: impl Into<String>) -> super::fields::FieldError {
    super::fields::FieldError { param: param.to_string(), message: format!("{param}: {}", msg.into()) }
}

/// `tools` and `tool_choice` from a chat request body, checked: the tools the model is shown
/// (none with `tool_choice: "none"`) and the choice. No tools gives an empty list and
/// `ToolChoice::None`.
pub fn from_body(body: &Value) -> Result<(Vec<Tool>, ToolChoice), super::fields::FieldError> {
    let mut tools = Vec::new();
    match body.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, t) in items.iter().enumerate() {
                let p = format!("tools[{i}]");
                if t.get("type").and_then(Value::as_str).unwrap_or("function") != "function" {
                    return Err(bad(&format!("{p}.type"), "only \"function\" tools are supported"));
                }
                let f = t
                    .get("function")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad(&format!("{p}.function"), "is required (an object)"))?;
                let name = f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
                let name =
                    name.ok_or_else(|| bad(&format!("{p}.function.name"), "is required (a non-empty string)"))?;
                if tools.iter().any(|x: &Tool| x.name == name) {
                    return Err(bad(&format!("{p}.function.name"), format!("{name:?} is given twice")));
                }
                let parameters = match f.get("parameters") {
                    None | Some(Value::Null) => json!({"type": "object"}),
                    Some(v @ Value::Object(_)) => v.clone(),
                    Some(_) => return Err(bad(&format!("{p}.function.parameters"), "must be a JSON schema object")),
                };
                let description = f.get("description").and_then(Value::as_str).map(str::to_string);
                tools.push(Tool { name: name.to_string(), description, parameters });
            }
        }
        Some(_) => return Err(bad("tools", "must be a list of tools")),
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("{other:?} is not one of \"none\", \"auto\", \"required\" or a function"),
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v.pointer("/function/name").and_then(Value::as_str);
            let name = name.ok_or_else(|| bad("tool_choice.function.name", "is required"))?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(bad("tool_choice.function.name", format!("{name:?} is not among the request's tools")));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(bad(
                "tool_choice",
                "must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required) {
        return Err(bad("tool_choice", "\"required\" needs at least one tool in tools"));
    }
    if choice == ToolChoice::None {
        tools.clear();
    }
    Ok((tools, choice))
}

/// The schema of one call's JSON object to `t`.
fn call_schema(t: &Tool) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// The constraint `choice` puts on the output: for `required`, one or more tool-call blocks
/// to any of `tools` (exactly one without `parallel`); for a named function, exactly one call
/// to it. None otherwise.
pub fn constraint(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Constraint> {
    let schema = match choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => json!({"anyOf": tools.iter().map(call_schema).collect::<Vec<_>>()}),
        ToolChoice::Named(n) => call_schema(tools.iter().find(|t| &t.name == n)?),
    };
    // Lark string literals take JSON's escapes.
    let lit = |s: String| serde_json::to_string(&s).expect("a string serializes");
    let one = format!("{} %json {} {}", lit(format!("{OPEN}\n")), schema, lit(format!("\n{CLOSE}")));
    let grammar = match choice {
        ToolChoice::Required if parallel => format!("start: call (\"\\n\" call)*\ncall: {one}\n"),
        _ => format!("start: call\ncall: {one}\n"),
    };
    Some(Constraint::Grammar(grammar))
}

/// Tool calls in `text`, and the text outside them. A block whose body is not a JSON object
/// with a string `name` stays in the text, as the model wrote it.
pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        let after = &rest[i + OPEN.len()..];
        let Some(j) = after.find(CLOSE) else { break };
        let body = after[..j].trim();
        let parsed = serde_json::from_str::<Value>(body).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_string();
            let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
            let arguments = match args {
                Value::String(s) => s,
                other => other.to_string(),
            };
            Some(ToolCall { name, arguments })
        });
        match parsed {
            Some(c) => {
                content.push_str(&rest[..i]);
                calls.push(c);
            }
            None => content.push_str(&rest[..i + OPEN.len() + j + CLOSE.len()]),
        }
        rest = &after[j + CLOSE.len()..];
    }
    content.push_str(rest);
    let content = if calls.is_empty() { content } else { content.trim().to_string() };
    (content, calls)
}

/// The system text that shows `tools` to a model whose chat template does not take them.
pub fn system_prompt(tools: &[Tool]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to answer the user. The functions are listed, one JSON signature a line, between <tools> and </tools>:\n<tools>\n",
    );
    for t in tools {
        let sig = json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}});
        s.push_str(&sig.to_string());
        s.push('\n');
    }
    s.push_str("</tools>\n\nTo call a function, answer with a JSON object of its name and arguments between <tool_call> and </tool_call>:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call>");
    s
}

/// An assistant turn's earlier tool calls written back as the model writes them.
pub fn render_calls(tool_calls: &Value) -> String {
    let mut s = String::new();
    for c in tool_calls.as_array().into_iter().flatten() {
        let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
        let args = match c.pointer("/function/arguments") {
            Some(Value::String(a)) => serde_json::from_str(a).unwrap_or(Value::String(a.clone())),
            Some(v) => v.clone(),
            None => json!({}),
        };
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&format!("{OPEN}\n{}\n{CLOSE}", json!({"name": name, "arguments": args})));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]})
    }

    #[test]
    fn tools_and_choice_are_read_and_checked() {
        let (tools, choice) = from_body(&weather()).unwrap();
        assert_eq!((tools.len(), &choice), (1, &ToolChoice::Auto));
        let mut b = weather();
        b["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(from_body(&b).unwrap().1, ToolChoice::Named("get_weather".into()));
        b["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(from_body(&b).unwrap_err().param, "tool_choice.function.name");
        b["tool_choice"] = json!("sometimes");
        assert_eq!(from_body(&b).unwrap_err().param, "tool_choice");
        assert_eq!(from_body(&json!({"tool_choice": "required"})).unwrap_err().param, "tool_choice");
        assert_eq!(
            from_body(&json!({"tools": [{"type": "function", "function": {}}]})).unwrap_err().param,
            "tools[0].function.name"
        );
        assert_eq!(from_body(&json!({})).unwrap(), (vec![], ToolChoice::None));
        let mut b = weather();
        b["tool_choice"] = json!("none");
        assert_eq!(from_body(&b).unwrap(), (vec![], ToolChoice::None), "none: no tool is shown");
    }

    #[test]
    fn calls_are_parsed_out_of_the_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() });
        // Not JSON: left in the text.
        let (content, calls) = parse("<tool_call>oops</tool_call> done");
        assert!(calls.is_empty());
        assert_eq!(content, "<tool_call>oops</tool_call> done");
        assert_eq!(parse("plain").0, "plain");
    }

    #[test]
    fn required_and_named_calls_compile_and_constrain() {
        let f = super::super::GuideFactory::new(&crate::model::tokenizer::WeaveTokenizer::bytes(), 256).unwrap();
        let (tools, _) = from_body(&weather()).unwrap();
        for choice in [ToolChoice::Required, ToolChoice::Named("get_weather".into())] {
            let c = constraint(&tools, &choice, true).unwrap();
            let mut g = f.compile(&c).unwrap_or_else(|e| panic!("{choice:?}: {e}"));
            let ok = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
            for &b in ok.as_bytes() {
                let m = g.matcher.compute_mask().unwrap();
                assert!(m.is_allowed(b as u32), "{choice:?}: {:?} refused", b as char);
                g.matcher.consume_token(b as u32).unwrap();
            }
            assert!(g.matcher.is_accepting().unwrap());
            assert_eq!(parse(ok).1.len(), 1);
        }
        assert!(constraint(&tools, &ToolChoice::Auto, true).is_none());
    }
}
