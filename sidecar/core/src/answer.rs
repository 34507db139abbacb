//! Answer extraction: turns a sampled completion into a normalised answer key that votes can
//! compare, per task type.
//!
//! Two completions that mean the same answer must give the same key ("The answer is 1,024." and
//! "1024" both give `1024`); a completion without a recognisable answer gives `None`, which a vote
//! counts as a disagreement rather than guessing.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// What kind of answer a request expects, which decides how it is extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AnswerType {
    /// A number; the final number of the completion (or the one after "answer"/`\boxed{}`).
    Number,
    /// A multiple-choice letter among the first `options` letters (`A`, `B`, ...).
    Choice {
        /// How many options the question has (2-26).
        options: u8,
    },
    /// `yes` or `no` (`true`/`false` count as `yes`/`no`).
    YesNo,
    /// A short free-text answer: first line, lower case, without articles and punctuation.
    /// The default: a request that does not say what it expects is compared this way.
    #[default]
    Short,
    /// A JSON value: the first JSON object or array in the completion, with keys sorted.
    Json,
}

impl AnswerType {
    /// A short label for metrics and logs (`number`, `choice`, `yes_no`, `short`, `json`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Choice { .. } => "choice",
            Self::YesNo => "yes_no",
            Self::Short => "short",
            Self::Json => "json",
        }
    }
}

/// Extracts the normalised answer of `text` for `answer_type`; `None` when there is none.
/// A `<think>…</think>` reasoning block is skipped ([`crate::reasoning::answer_part`]).
pub fn extract_answer(text: &str, answer_type: AnswerType) -> Option<String> {
    let text = super::reasoning::answer_part(text);
    match answer_type {
        AnswerType::Number => extract_number(text),
        AnswerType::Choice { options } => extract_choice(text, options),
        AnswerType::YesNo => extract_yes_no(text),
        AnswerType::Short => normalise_short(text),
        AnswerType::Json => extract_json(text),
    }
}

// The patterns are literals, so compiling them cannot fail at run time; tests compile each one.
fn pattern(source: &str) -> Regex {
    Regex::new(source).unwrap_or_else(|e| panic!("invalid built-in pattern {source}: {e}"))
}

static NUMBER: LazyLock<Regex> = LazyLock::new(|| pattern(r"[-+]?\d[\d,]*(?:\.\d+)?"));
static BOXED: LazyLock<Regex> = LazyLock::new(|| pattern(r"\\boxed\{\s*([^{}]*?)\s*\}"));
static ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    pattern(r"(?i:answer)(?:\s+(?i:is))?\s*[:=\-]?\s*\**\s*([-+]?\d[\d,]*(?:\.\d+)?)")
});

/// The number a completion answers: `\boxed{..}`, then the number after "answer (is)", then the
/// last number of the text (models state the result last: "3 + 5 = 8").
fn extract_number(text: &str) -> Option<String> {
    if let Some(inner) = BOXED.captures(text).and_then(|c| c.get(1))
        && let Some(m) = NUMBER.find(inner.as_str())
    {
        return normalise_number(m.as_str());
    }
    if let Some(m) = ANSWER_IS.captures(text).and_then(|c| c.get(1)) {
        return normalise_number(m.as_str());
    }
    NUMBER
        .find_iter(text)
        .last()
        .and_then(|m| normalise_number(m.as_str()))
}

/// `+1,024.50` → `1024.5`; `-0` → `0`; `7.0` → `7`. Commas are thousands separators.
fn normalise_number(raw: &str) -> Option<String> {
    let cleaned: String = raw.chars().filter(|c| *c != ',').collect();
    let cleaned = cleaned.trim_end_matches('.');
    let negative = cleaned.starts_with('-');
    let digits = cleaned.trim_start_matches(['-', '+']);
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f.trim_end_matches('0')),
        None => (digits, ""),
    };
    if int_part.is_empty() || !int_part.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int_part = int_part.trim_start_matches('0');
    let int_part = if int_part.is_empty() { "0" } else { int_part };
    let mut out = String::new();
    let is_zero = int_part == "0" && frac_part.is_empty();
    if negative && !is_zero {
        out.push('-');
    }
    out.push_str(int_part);
    if !frac_part.is_empty() {
        out.push('.');
        out.push_str(frac_part);
    }
    Some(out)
}

static CHOICE_BOXED: LazyLock<Regex> = LazyLock::new(|| pattern(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}"));
static CHOICE_ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    pattern(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*\**\s*\(?([A-Z])\b")
});
static CHOICE_PARENS: LazyLock<Regex> = LazyLock::new(|| pattern(r"\(([A-Z])\)"));
static CHOICE_LEADING: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^\W*([A-Za-z])(?:[).:,]|\s*$|\s+[-–])"));
static CHOICE_MARKED: LazyLock<Regex> = LazyLock::new(|| pattern(r"\b([A-Z])[):]"));

/// The option letter a completion picks, upper case, among the first `options` letters. Tried in
/// order: `\boxed{B}`, "answer is B", "(B)", a letter opening the text ("B", "b.", "B) ..."),
/// a marked letter anywhere ("B)" or "B:"). A bare capital "A" inside a sentence is an article, so
/// it is never taken on its own.
fn extract_choice(text: &str, options: u8) -> Option<String> {
    let options = options.clamp(2, 26);
    let allowed = |c: char| {
        let c = c.to_ascii_uppercase();
        c.is_ascii_uppercase() && (c as u8 - b'A') < options
    };
    let patterns: [&Regex; 5] = [
        &CHOICE_BOXED,
        &CHOICE_ANSWER_IS,
        &CHOICE_PARENS,
        &CHOICE_LEADING,
        &CHOICE_MARKED,
    ];
    for re in patterns {
        for caps in re.captures_iter(text) {
            if let Some(letter) = caps.get(1).and_then(|m| m.as_str().chars().next())
                && allowed(letter)
            {
                return Some(letter.to_ascii_uppercase().to_string());
            }
        }
    }
    None
}

static YES_NO: LazyLock<Regex> = LazyLock::new(|| pattern(r"(?i)\b(yes|no|true|false)\b"));

/// `yes` or `no`: the first yes/no/true/false word of the completion.
fn extract_yes_no(text: &str) -> Option<String> {
    let word = YES_NO.captures(text)?.get(1)?.as_str().to_ascii_lowercase();
    Some(
        if word == "yes" || word == "true" {
            "yes"
        } else {
            "no"
        }
        .to_string(),
    )
}

static ANSWER_PREFIX: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^(?i:(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:\-]?\s*)"));
static ARTICLES: LazyLock<Regex> = LazyLock::new(|| pattern(r"\b(?:a|an|the)\b"));

/// A short answer normalised SQuAD-style: first non-empty line, without an "answer is" prefix,
/// lower case, punctuation dropped, articles dropped, whitespace collapsed.
fn normalise_short(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let line = ANSWER_PREFIX.replace(line, "");
    let lower = line.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    let no_articles = ARTICLES.replace_all(&no_punct, " ");
    let collapsed = no_articles.split_whitespace().collect::<Vec<_>>().join(" ");
    (!collapsed.is_empty()).then_some(collapsed)
}

/// The first JSON object or array in the completion (code fences and prose around it are
/// ignored), re-serialised with sorted keys so equal values give equal keys.
fn extract_json(text: &str) -> Option<String> {
    parse_first_json(text).map(|value| canonical_json(&value))
}

/// Parses the first JSON object or array embedded in `text`.
pub fn parse_first_json(text: &str) -> Option<serde_json::Value> {
    for (start, c) in text.char_indices() {
        if c != '{' && c != '[' {
            continue;
        }
        let mut stream =
            serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
        if let Some(Ok(value)) = stream.next()
            && (value.is_object() || value.is_array())
        {
            return Some(value);
        }
    }
    None
}

/// Serialises `value` with object keys sorted at every level, whatever map order serde_json
/// was built with.
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn sorted(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    // Only maps, sequences and scalars: serialising a Value cannot fail, but fall back anyway.
    serde_json::to_string(&sorted(value)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(text: &str) -> Option<String> {
        extract_answer(text, AnswerType::Number)
    }
    fn choice(text: &str) -> Option<String> {
        extract_answer(text, AnswerType::Choice { options: 3 })
    }

    #[test]
    fn built_in_patterns_compile() {
        // Forces every pattern, so a typo fails here rather than on a request.
        let patterns: [&LazyLock<Regex>; 10] = [
            &NUMBER,
            &BOXED,
            &ANSWER_IS,
            &CHOICE_BOXED,
            &CHOICE_ANSWER_IS,
            &CHOICE_PARENS,
            &CHOICE_LEADING,
            &CHOICE_MARKED,
            &YES_NO,
            &ANSWER_PREFIX,
        ];
        for p in patterns {
            assert!(!LazyLock::force(p).as_str().is_empty());
        }
        assert!(ARTICLES.is_match("the"));
    }

    #[test]
    fn final_number_is_taken_and_normalised() {
        assert_eq!(num("3 + 5 = 8").as_deref(), Some("8"));
        assert_eq!(num("The sum is 1,024.").as_deref(), Some("1024"));
        assert_eq!(num("It is 7.50 dollars").as_deref(), Some("7.5"));
        assert_eq!(num("7.0").as_deref(), Some("7"));
        assert_eq!(num("-0").as_deref(), Some("0"));
        assert_eq!(num("minus: -12").as_deref(), Some("-12"));
        assert_eq!(num("007").as_deref(), Some("7"));
        assert_eq!(num("no digits here"), None);
    }

    #[test]
    fn explicit_answer_beats_last_number() {
        assert_eq!(
            num("The answer is 42, not 41 or 43.").as_deref(),
            Some("42")
        );
        assert_eq!(num("Answer: 15 (from 7 and 8)").as_deref(), Some("15"));
        assert_eq!(num(r"so \boxed{17} and 3 more").as_deref(), Some("17"));
    }

    #[test]
    fn choice_letters() {
        assert_eq!(choice("B").as_deref(), Some("B"));
        assert_eq!(choice("b.").as_deref(), Some("B"));
        assert_eq!(choice("(C) Paris").as_deref(), Some("C"));
        assert_eq!(choice("The answer is C.").as_deref(), Some("C"));
        assert_eq!(
            choice("I think the answer is (B) Paris").as_deref(),
            Some("B")
        );
        assert_eq!(choice("C) 42").as_deref(), Some("C"));
        assert_eq!(choice(r"\boxed{A}").as_deref(), Some("A"));
    }

    #[test]
    fn choice_ignores_articles_and_out_of_range_letters() {
        assert_eq!(
            choice("A cat is an animal, so B) is right").as_deref(),
            Some("B")
        );
        assert_eq!(choice("The answer is D."), None);
        assert_eq!(choice("I do not know"), None);
        assert_eq!(
            extract_answer("D", AnswerType::Choice { options: 4 }).as_deref(),
            Some("D")
        );
    }

    #[test]
    fn yes_no_takes_first_word() {
        let yn = |t: &str| extract_answer(t, AnswerType::YesNo);
        assert_eq!(yn("Yes, it is.").as_deref(), Some("yes"));
        assert_eq!(yn("NO").as_deref(), Some("no"));
        assert_eq!(yn("That is true").as_deref(), Some("yes"));
        assert_eq!(yn("No. Well, yes.").as_deref(), Some("no"));
        // "know" and "eyes" contain the letters but are not the words.
        assert_eq!(yn("I know their eyes"), None);
    }

    #[test]
    fn short_answers_are_normalised() {
        let short = |t: &str| extract_answer(t, AnswerType::Short);
        assert_eq!(
            short("The answer is: The Eiffel Tower!").as_deref(),
            Some("eiffel tower")
        );
        assert_eq!(
            short("  Paris.\nIt is the capital.").as_deref(),
            Some("paris")
        );
        assert_eq!(short("\n\n"), None);
        assert_eq!(short("...").as_deref(), None);
    }

    #[test]
    fn json_is_found_and_canonical() {
        let a = extract_answer(
            "Here: ```json\n{\"b\": 1, \"a\": [2, {\"d\":0,\"c\":1}]}\n```",
            AnswerType::Json,
        );
        let b = extract_answer("{\"a\":[2,{\"c\":1,\"d\":0}],\"b\":1}", AnswerType::Json);
        assert_eq!(a, b);
        assert_eq!(a.as_deref(), Some(r#"{"a":[2,{"c":1,"d":0}],"b":1}"#));
        assert_eq!(
            extract_answer("{not json} and no more", AnswerType::Json),
            None
        );
        assert_eq!(
            extract_answer("bad {x} then {\"ok\": true}", AnswerType::Json).as_deref(),
            Some(r#"{"ok":true}"#)
        );
    }

    #[test]
    fn answer_type_serialises_with_a_tag() -> Result<(), serde_json::Error> {
        let json = serde_json::to_string(&AnswerType::Choice { options: 3 })?;
        assert_eq!(json, r#"{"type":"choice","options":3}"#);
        let back: AnswerType = serde_json::from_str(r#"{"type":"yesNo"}"#)?;
        assert_eq!(back, AnswerType::YesNo);
        Ok(())
    }
}
