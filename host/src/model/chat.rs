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
