//! Chat templates: the Jinja template stored in a model's GGUF metadata
//! (`tokenizer.chat_template`), rendered with minijinja and Python-compatible string methods.

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One chat message, as the OpenAI API and Hugging Face templates both see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or `tool`).
    pub role: String,
    /// The text of the message.
    pub content: String,
}

/// Why a prompt could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template is invalid: {0}")]
    Invalid(String),
    #[error("the model's chat template rejected the messages: {0}")]
    Render(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Used when a model's GGUF carries no template: ChatML, which many small chat models use.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Used when a model's GGUF carries no template but its vocabulary has Gemma's turn tokens (the
/// Gemma 3 base model): Gemma's turns, system text folded into a user turn as Gemma does. No BOS
/// here: the tokenizer adds it.
pub const GEMMA_TURNS: &str = "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// Template instructions one rendering may run: real models' templates use a few thousand for a
/// long conversation.
const TEMPLATE_FUEL: u64 = 1_000_000;

/// The longest prompt text a template may render.
const MAX_RENDERED_BYTES: usize = 16 << 20;

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to the template as Hugging Face does.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // Templates come with model files, which may be hostile: bound their work (an endless or
        // enormous loop runs out of fuel) and their nesting (minijinja's recursion limit).
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders the conversation, ending with the assistant's header when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| TemplateError::Render(e.to_string()))
            .and_then(|text| {
                if text.len() > MAX_RENDERED_BYTES {
                    Err(TemplateError::Render(format!(
                        "the chat template rendered {} bytes, more than the {MAX_RENDERED_BYTES} a prompt may have",
                        text.len()
                    )))
                } else {
                    Ok(text)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render(&[user("hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_turns_name_the_assistant_model() {
        let t = ChatTemplate::new(GEMMA_TURNS, "", "").unwrap();
        let out = t
            .render(
                &[
                    user("hi "),
                    ChatMessage {
                        role: "assistant".into(),
                        content: "yes".into(),
                    },
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyes<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}", "", "").unwrap();
        assert_eq!(t.render(&[user("  x ")], false).unwrap(), "X");
    }

    /// Hostile templates from model files: an enormous loop and unbounded recursion end in a
    /// render error, quickly, never a hang.
    #[test]
    fn hostile_templates_are_bounded() {
        let started = std::time::Instant::now();
        for source in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ] {
            let t = ChatTemplate::new(source, "", "").unwrap();
            let err = t.render(&[user("x")], false).unwrap_err();
            assert!(matches!(err, TemplateError::Render(_)), "{source}: {err}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn raise_exception_becomes_a_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", "", "").unwrap();
        let err = t.render(&[user("x")], false).unwrap_err().to_string();
        assert!(err.contains("only user turns"), "{err}");
    }
}
