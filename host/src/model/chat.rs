//! The chat template a GGUF file carries (`tokenizer.chat_template`, Jinja), rendered with
//! minijinja for one user message and the generation prompt.

use super::gguf::Gguf;

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// `None` when the file has no template.
    pub fn from_gguf(g: &Gguf, bos: &str, eos: &str) -> Option<ChatTemplate> {
        let source = g.get_str("tokenizer.chat_template").ok()?.to_string();
        Some(ChatTemplate { source, bos: bos.into(), eos: eos.into() })
    }

    /// The prompt text for one user turn, ending where the assistant's reply begins.
    pub fn render_user(&self, user: &str) -> Result<String, String> {
        self.render(&[("user".to_string(), user.to_string())])
    }

    /// The prompt text for a conversation of `(role, content)` messages, ending where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        self.render_with(messages, true)
    }

    /// Whether the template reads a `tools` variable (one that does not is shown tools by a
    /// system message weave writes).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The tool-call format the template teaches when it is not the Hermes `<tool_call>` one
    /// weave parses: its name (`None` for Hermes, or a template that shows no tools).
    pub fn foreign_tool_format(&self) -> Option<&'static str> {
        let s = &self.source;
        if !self.takes_tools() || s.contains("<tool_call>") {
            return None;
        }
        Some(if s.contains("[TOOL_CALLS]") {
            "Mistral's [TOOL_CALLS]"
        } else if s.contains("<|python_tag|>") || s.contains("ipython") {
            "Llama 3's <|python_tag|> / JSON"
        } else if s.contains("tool▁call") {
            "DeepSeek's <｜tool▁call▁begin｜>"
        } else if s.contains("functools") {
            "FireFunction's functools"
        } else {
            "a format weave does not know"
        })
    }

    /// The conversation as JSON messages (OpenAI's shape: `role`, `content`, `tool_calls`,
    /// `tool_call_id`) with the request's `tools`, for a template that reads them.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.add_template("chat", &self.source).map_err(|e| format!("chat template does not parse: {e}"))?;
        let t = env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            tools => tools.map(minijinja::Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| format!("chat template failed to render: {e}"))
    }

    /// As [`render`](Self::render); without `add_generation_prompt` it stops after the last
    /// message.
    pub fn render_with(&self, messages: &[(String, String)], add_generation_prompt: bool) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.add_template("chat", &self.source).map_err(|e| format!("chat template does not parse: {e}"))?;
        let t = env.get_template("chat").map_err(|e| e.to_string())?;
        let messages: Vec<_> =
            messages.iter().map(|(role, content)| minijinja::context! { role => role, content => content }).collect();
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| format!("chat template failed to render: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(source: &str) -> ChatTemplate {
        ChatTemplate { source: source.into(), bos: String::new(), eos: String::new() }
    }

    #[test]
    fn tool_formats_are_told_apart() {
        assert_eq!(t("{% for m in messages %}{{ m.content }}{% endfor %}").foreign_tool_format(), None);
        assert_eq!(t("{% if tools %}<tool_call>{% endif %}").foreign_tool_format(), None);
        assert_eq!(t("{% if tools %}[TOOL_CALLS]{% endif %}").foreign_tool_format(), Some("Mistral's [TOOL_CALLS]"));
        assert!(t("{% if tools %}<|python_tag|>{% endif %}").foreign_tool_format().unwrap().contains("Llama 3"));
        let r = t("{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}{{ tools | length }}")
            .render_json(
                &[serde_json::json!({"role": "user", "content": "hi"})],
                Some(&serde_json::json!([1, 2])),
                true,
            )
            .unwrap();
        assert_eq!(r, "user:hi2");
    }
}
