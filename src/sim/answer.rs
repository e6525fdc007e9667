//! What the simulated model says: a deterministic answer in keeping with the question.
//!
//! A reply is a [`Script`]: a few sentences built from the question (its topic, the
//! images it came with, a sum it asks for, a tool's result), then a fixed sentence
//! repeated for as long as the reply goes on. One token is one word, so a reply of `n`
//! tokens has exactly `n` whitespace-separated words. Quotes from the prompt are
//! borrowed from the request body; nothing here allocates for a plain text question.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::Value;

use super::prompt::Question;

/// Most words an answer quotes from the prompt, so a long question gets a short echo.
const QUOTE_WORDS: u32 = 12;

/// Sentence pieces a script says once; the longest template uses four.
const HEAD_PIECES: usize = 4;

/// Said after an answer's own sentences, over and over, as long as the reply lasts.
const ANSWER_TAIL: &str = "This reply comes from the STEP3-VL simulator, which answers the \
                           same question the same way every time.";
/// The same for reasoning.
const REASONING_TAIL: &str = "I should keep the answer short and on topic.";

/// What the model thinks and then says for one request, before lengths are applied.
#[derive(Clone, Debug)]
pub(super) struct Answer<'a> {
    pub reasoning: Script<'a>,
    pub body: Body<'a>,
}

/// What follows the reasoning: text, or a call of one of the offered tools.
#[derive(Clone, Debug)]
pub(super) enum Body<'a> {
    Text(Script<'a>),
    Call(ToolCall<'a>),
}

/// A function call the model makes instead of answering.
#[derive(Clone, Debug)]
pub(super) struct ToolCall<'a> {
    pub name: Cow<'a, str>,
    /// The arguments as a JSON object in a string, as OpenAI's API carries them.
    pub arguments: String,
    /// `finish_reason` of a completed call: `tool_calls` when the model chose to call,
    /// `stop` when the request named the function (vLLM and OpenAI both report it so).
    pub finish_reason: &'static str,
}

/// The tool a request makes the model call.
#[derive(Clone, Copy, Debug)]
pub(super) struct ToolChoice<'a> {
    pub name: &'a str,
    /// The function's JSON-schema `parameters`, if it has any.
    pub parameters: Option<&'a Value>,
    /// The request named this function (`tool_choice: {"function": {"name": …}}`).
    pub named: bool,
}

/// Tokens (characters) of a call's arguments per streamed delta.
const ARGUMENT_CHARS_PER_TOKEN: usize = 4;

impl ToolCall<'_> {
    /// Tokens the call takes: one for the function name, then the arguments four
    /// characters a token (as the streamed deltas carry them).
    pub fn tokens(&self) -> u32 {
        let pieces = self
            .arguments
            .chars()
            .count()
            .div_ceil(ARGUMENT_CHARS_PER_TOKEN);
        u32::try_from(pieces.max(1)).map_or(u32::MAX, |pieces| pieces.saturating_add(1))
    }

    /// The arguments' characters that token `index` (1-based: token 0 is the name) carries.
    pub fn argument_piece(&self, index: u32) -> &str {
        let start = (index.saturating_sub(1) as usize).saturating_mul(ARGUMENT_CHARS_PER_TOKEN);
        self.char_slice(start..start.saturating_add(ARGUMENT_CHARS_PER_TOKEN))
    }

    /// The arguments as far as the first `tokens` tokens of the call got.
    pub fn arguments_after(&self, tokens: u32) -> &str {
        let chars = (tokens.saturating_sub(1) as usize).saturating_mul(ARGUMENT_CHARS_PER_TOKEN);
        self.char_slice(0..chars)
    }

    fn char_slice(&self, chars: Range<usize>) -> &str {
        let byte = |n: usize| {
            self.arguments
                .char_indices()
                .nth(n)
                .map_or(self.arguments.len(), |(at, _)| at)
        };
        &self.arguments[byte(chars.start)..byte(chars.end)]
    }

    pub fn into_owned(self) -> ToolCall<'static> {
        ToolCall {
            name: Cow::Owned(self.name.into_owned()),
            arguments: self.arguments,
            finish_reason: self.finish_reason,
        }
    }
}

/// Builds what the model says to `question`, calling `tool` when one is to be called.
pub(super) fn answer<'a>(question: &Question<'a>, tool: Option<ToolChoice<'a>>) -> Answer<'a> {
    let topic = topic(question.text);
    if let Some(tool) = tool {
        let reasoning = Script::new(
            [
                Piece::fixed("Let me call"),
                Piece::quote(tool.name, ""),
                Piece::fixed("to answer this."),
            ],
            REASONING_TAIL,
        );
        let call = ToolCall {
            name: Cow::Borrowed(tool.name),
            arguments: tool_arguments(tool.parameters, topic),
            finish_reason: if tool.named { "stop" } else { "tool_calls" },
        };
        return Answer {
            reasoning,
            body: Body::Call(call),
        };
    }
    let (reasoning, text) = if let Some(result) = question.tool_result {
        let output = Piece::quote_or(result.output, "nothing", ".");
        let text = match result.name {
            Some(name) => Script::new(
                [
                    Piece::fixed("The"),
                    Piece::quote(name, ""),
                    Piece::fixed("tool returned"),
                    output,
                ],
                ANSWER_TAIL,
            ),
            None => Script::new([Piece::fixed("The tool returned"), output], ANSWER_TAIL),
        };
        (
            Script::new(
                [Piece::fixed("Let me read what the tool returned.")],
                REASONING_TAIL,
            ),
            text,
        )
    } else if let Some(sum) = arithmetic(question.text) {
        let value = match sum.value {
            Some(value) => Piece::owned(value, "."),
            None => Piece::fixed("undefined, because it divides by zero."),
        };
        (
            Script::new(
                [
                    Piece::fixed("Let me work out"),
                    Piece::quote(sum.expression, "."),
                ],
                REASONING_TAIL,
            ),
            Script::new([Piece::fixed("The answer is"), value], ANSWER_TAIL),
        )
    } else if question.images > 0 {
        let (count, noun) = images(question.images);
        (
            Script::new(
                [
                    Piece::fixed("Let me look at the"),
                    count.clone(),
                    Piece::fixed(noun),
                    Piece::fixed("first."),
                ],
                REASONING_TAIL,
            ),
            Script::new(
                [
                    Piece::fixed("The"),
                    count,
                    Piece::fixed(if question.images == 1 {
                        "image you shared arrived; you asked about"
                    } else {
                        "images you shared arrived; you asked about"
                    }),
                    Piece::quote_or(topic, "what it shows", "."),
                ],
                ANSWER_TAIL,
            ),
        )
    } else {
        let subject = Piece::quote_or(topic, "your message", ".");
        (
            Script::new(
                [Piece::fixed("Let me think about"), subject.clone()],
                REASONING_TAIL,
            ),
            Script::new(
                [Piece::fixed("The question was about"), subject],
                ANSWER_TAIL,
            ),
        )
    };
    Answer {
        reasoning,
        body: Body::Text(text),
    }
}

/// A run of words: fixed text, a quote from the prompt, or a computed value, with the
/// punctuation that follows its last word.
#[derive(Clone, Debug, Default)]
struct Piece<'a> {
    text: Cow<'a, str>,
    /// How many of `text`'s words are said (a quote stops after [`QUOTE_WORDS`]).
    words: u32,
    end: &'static str,
    /// `text` is a quote: words are split on any whitespace, not just single spaces.
    quoted: bool,
}

impl<'a> Piece<'a> {
    /// Text of the simulator's own: words separated by single spaces.
    fn fixed(text: &'static str) -> Self {
        Self::spaced(Cow::Borrowed(text), "")
    }

    /// A computed value (a number): words separated by single spaces.
    fn owned(text: String, end: &'static str) -> Self {
        Self::spaced(Cow::Owned(text), end)
    }

    fn spaced(text: Cow<'a, str>, end: &'static str) -> Self {
        debug_assert!(!text.is_empty() && !text.contains("  ") && text.trim() == text);
        let spaces = text.bytes().filter(|&b| b == b' ').count();
        Self {
            words: u32::try_from(spaces + 1).unwrap_or(u32::MAX),
            text,
            end,
            quoted: false,
        }
    }

    fn quote(text: &'a str, end: &'static str) -> Self {
        Self {
            words: word_count(text, QUOTE_WORDS),
            text: Cow::Borrowed(text),
            end,
            quoted: true,
        }
    }

    /// A quote, or `fallback` when there is nothing to quote.
    fn quote_or(text: &'a str, fallback: &'static str, end: &'static str) -> Self {
        let quote = Self::quote(text, end);
        if quote.words > 0 {
            quote
        } else {
            Self {
                end,
                ..Self::fixed(fallback)
            }
        }
    }

    /// The piece's words, each with the punctuation glued to it.
    fn words(&self) -> Words<'_> {
        Words {
            rest: &self.text,
            left: self.words,
            quoted: self.quoted,
            end: self.end,
        }
    }

    /// Appends up to `max` of the piece's words to `out` (after a space if `space`);
    /// returns how many. Fixed text that fits whole is copied in one go: this runs for
    /// every answer.
    fn write(&self, max: u32, space: bool, out: &mut String) -> u32 {
        if self.words == 0 {
            return 0;
        }
        if space {
            out.push(' ');
        }
        if !self.quoted && self.words <= max {
            out.push_str(&self.text);
            if !self.end.is_empty() {
                out.push_str(self.end);
            }
            return self.words;
        }
        let mut said = 0;
        for (word, end) in self.words().take(max as usize) {
            if said > 0 {
                out.push(' ');
            }
            out.push_str(word);
            if !end.is_empty() {
                out.push_str(end);
            }
            said += 1;
        }
        said
    }

    /// Word `index` (below `self.words`) and the punctuation glued to it.
    fn word(&self, index: u32) -> (&str, &'static str) {
        self.words().nth(index as usize).unwrap_or_default()
    }

    fn into_owned(self) -> Piece<'static> {
        Piece {
            text: Cow::Owned(self.text.into_owned()),
            words: self.words,
            end: self.end,
            quoted: self.quoted,
        }
    }
}

/// The first `left` words of `rest`, the last with `end` glued to it. The simulator's
/// own texts split at single spaces (a plain byte search: this runs for every word of
/// every answer); quotes at any whitespace.
struct Words<'t> {
    rest: &'t str,
    left: u32,
    quoted: bool,
    end: &'static str,
}

impl<'t> Iterator for Words<'t> {
    type Item = (&'t str, &'static str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (word, rest) = if self.quoted {
            let text = self.rest.trim_start();
            let end = text.find(char::is_whitespace).unwrap_or(text.len());
            (&text[..end], &text[end..])
        } else {
            let text = self.rest;
            match text.bytes().position(|b| b == b' ') {
                Some(at) => (&text[..at], &text[at + 1..]),
                None => (text, ""),
            }
        };
        self.rest = rest;
        Some((word, if self.left == 0 { self.end } else { "" }))
    }
}

fn word_count(text: &str, cap: u32) -> u32 {
    let count = text.split_whitespace().take(cap as usize).count();
    u32::try_from(count).unwrap_or(cap)
}

/// The words of one part of a reply (its reasoning or its answer), as many as wanted.
#[derive(Clone, Debug)]
pub(super) struct Script<'a> {
    /// Said once, in order.
    head: [Piece<'a>; HEAD_PIECES],
    head_words: u32,
    /// Said over and over after the head; fixed text, so never empty.
    tail: Piece<'static>,
}

impl<'a> Script<'a> {
    /// At most [`HEAD_PIECES`] pieces; the templates above stay within that.
    fn new<const N: usize>(pieces: [Piece<'a>; N], tail: &'static str) -> Self {
        const { assert!(N <= HEAD_PIECES) };
        let mut head: [Piece<'a>; HEAD_PIECES] = Default::default();
        for (slot, piece) in head.iter_mut().zip(pieces) {
            *slot = piece;
        }
        let head_words = head.iter().map(|p| p.words).sum();
        Self {
            head,
            head_words,
            tail: Piece::fixed(tail),
        }
    }

    /// Word `index` of the script and the punctuation glued to it.
    pub fn word(&self, index: u32) -> (&str, &'static str) {
        let mut index = index;
        for piece in &self.head {
            if index < piece.words {
                return piece.word(index);
            }
            index -= piece.words;
        }
        self.tail.word(index % self.tail.words.max(1))
    }

    /// The first `count` words as one string, separated by single spaces, with a space
    /// before the first too when `space_first`.
    pub fn text(&self, count: u32, space_first: bool) -> String {
        let mut out = String::with_capacity(count as usize * 8);
        let mut left = count;
        let mut space = space_first;
        for piece in &self.head {
            if left == 0 {
                return out;
            }
            left -= piece.write(left, space, &mut out);
            space = space || piece.words > 0;
        }
        // The tail is fixed text, never empty; checked so the loop cannot spin idle.
        while left > 0 && self.tail.words > 0 {
            left -= self.tail.write(left, space, &mut out);
            space = true;
        }
        out
    }

    pub fn into_owned(self) -> Script<'static> {
        Script {
            head: self.head.map(Piece::into_owned),
            head_words: self.head_words,
            tail: self.tail,
        }
    }
}

/// Words that open a request rather than name its subject ("Please describe", "What is").
#[rustfmt::skip]
const OPENING_WORDS: &[&str] = &[
    "please", "can", "could", "would", "will", "you", "tell", "me", "about", "describe",
    "explain", "summarise", "summarize", "what", "what's", "whats", "who", "who's", "how",
    "why", "is", "are", "was", "were", "do", "does", "did", "i", "give", "show", "write",
    "say", "in",
];

/// The subject of a question: its text without a leading "please tell me what is" and
/// without trailing punctuation or "please". A slice of `text`.
fn topic(text: &str) -> &str {
    let mut rest = text.trim_start();
    while let Some((first, after)) = rest.split_once(char::is_whitespace) {
        let bare = first.trim_end_matches(|c: char| c.is_ascii_punctuation());
        if !OPENING_WORDS.iter().any(|w| w.eq_ignore_ascii_case(bare)) {
            break;
        }
        rest = after.trim_start();
    }
    let mut rest = rest.trim_end_matches(is_closing);
    if let Some((before, last)) = rest.rsplit_once(char::is_whitespace)
        && last.eq_ignore_ascii_case("please")
    {
        rest = before.trim_end_matches(is_closing);
    }
    rest
}

fn is_closing(c: char) -> bool {
    c.is_whitespace() || matches!(c, '?' | '!' | '.' | ',' | ';' | ':')
}

/// `(count, noun)` pieces for `n` images: "image" alone for one, "two images" and so on.
fn images(n: u32) -> (Piece<'static>, &'static str) {
    const NUMBERS: [&str; 13] = [
        "no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    match n {
        1 => (Piece::default(), "image"),
        n => match NUMBERS.get(n as usize) {
            Some(word) => (Piece::fixed(word), "images"),
            None => (Piece::owned(n.to_string(), ""), "images"),
        },
    }
}

/// A sum the question asks for.
struct Arithmetic<'a> {
    /// The expression as the question wrote it.
    expression: &'a str,
    /// Its value, or `None` for a division by zero.
    value: Option<String>,
}

/// `a op b` in `text` when that is all the arithmetic it asks for ("What is 2+2?",
/// "compute 12 * 7"); chained or malformed expressions are not trivial and get `None`.
fn arithmetic(text: &str) -> Option<Arithmetic<'_>> {
    // Bytes are enough: an ASCII digit byte is never part of a longer UTF-8 character.
    let start = text.bytes().position(|b| b.is_ascii_digit())?;
    // A minus sign right before the number belongs to it, unless it follows a word.
    let start = match text[..start].strip_suffix('-') {
        Some(before) if !before.ends_with(|c: char| c.is_alphanumeric()) => start - 1,
        _ => start,
    };
    let (a, rest) = number(&text[start..])?;
    let rest = rest.trim_start();
    let op = rest.chars().next()?;
    if !matches!(op, '+' | '-' | '*' | 'x' | 'X' | '×' | '/' | '÷') {
        return None;
    }
    let (b, after) = number(rest[op.len_utf8()..].trim_start())?;
    let follows = after.trim_start().chars().next();
    if follows.is_some_and(|c| c.is_ascii_digit() || "+-*/x×÷^=%".contains(c)) {
        return None;
    }
    let expression = &text[start..text.len() - after.len()];
    let value = match (a, b) {
        (Number::Int(a), Number::Int(b)) => int_arithmetic(a, op, b)?,
        (a, b) => float_arithmetic(a.as_f64(), op, b.as_f64())?,
    };
    Some(Arithmetic { expression, value })
}

#[derive(Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            // Precision loss is fine: such sums are answered approximately anyway.
            Self::Int(n) => n as f64,
            Self::Float(x) => x,
        }
    }
}

/// A decimal number at the start of `text` and what follows it.
fn number(text: &str) -> Option<(Number, &str)> {
    let digits_from = usize::from(text.starts_with('-'));
    let int_end = digits_from
        + text[digits_from..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len() - digits_from);
    if int_end == digits_from {
        return None;
    }
    let fraction = text[int_end..]
        .strip_prefix('.')
        .map(|f| f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len()))
        .filter(|&len| len > 0);
    match fraction {
        Some(len) => {
            let end = int_end + 1 + len;
            Some((Number::Float(text[..end].parse().ok()?), &text[end..]))
        }
        None => Some((Number::Int(text[..int_end].parse().ok()?), &text[int_end..])),
    }
}

/// `Some(None)` for a division by zero; `None` when the result overflows.
fn int_arithmetic(a: i128, op: char, b: i128) -> Option<Option<String>> {
    let value = match op {
        '+' => a.checked_add(b)?,
        '-' => a.checked_sub(b)?,
        '/' | '÷' if b == 0 => return Some(None),
        '/' | '÷' if a % b != 0 => return float_arithmetic(a as f64, op, b as f64),
        '/' | '÷' => a.checked_div(b)?,
        _ => a.checked_mul(b)?,
    };
    Some(Some(value.to_string()))
}

fn float_arithmetic(a: f64, op: char, b: f64) -> Option<Option<String>> {
    let value = match op {
        '+' => a + b,
        '-' => a - b,
        '/' | '÷' if b == 0.0 => return Some(None),
        '/' | '÷' => a / b,
        _ => a * b,
    };
    if !value.is_finite() {
        return None;
    }
    // Six decimals, then drop trailing zeros: 0.1 + 0.2 says 0.3, 7 / 2 says 3.5.
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    Some(Some(if text == "-0" { "0" } else { text }.to_owned()))
}

/// The arguments of a call to a function with this JSON-schema `parameters`: every
/// required property, in the order `required` lists them, with a value of its type
/// (strings say the question's topic), written with the separators of Python's
/// `json.dumps`, as vLLM's tool parsers write them (`{"city": "Paris"}`).
pub(super) fn tool_arguments(parameters: Option<&Value>, topic: &str) -> String {
    let mut out = String::new();
    match parameters {
        Some(schema) => write_value(schema, topic, &mut out),
        None => out.push_str("{}"),
    }
    out
}

fn write_value(schema: &Value, topic: &str, out: &mut String) {
    let listed = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|values| values.first());
    if let Some(value) = listed.or_else(|| schema.get("const")) {
        return write_json(value, out);
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        // A list of types: the first that is not "null".
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => write_object(schema, topic, out),
        "array" => out.push_str("[]"),
        "integer" | "number" => out.push('1'),
        "boolean" => out.push_str("true"),
        "null" => out.push_str("null"),
        _ => write_json(
            &Value::from(if topic.is_empty() { "example" } else { topic }),
            out,
        ),
    }
}

fn write_object(schema: &Value, topic: &str, out: &mut String) {
    let properties = schema.get("properties");
    let required = schema.get("required").and_then(Value::as_array);
    out.push('{');
    let names = required.into_iter().flatten().filter_map(Value::as_str);
    for (i, name) in names.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_json(&Value::from(name), out);
        out.push_str(": ");
        let property = properties.and_then(|p| p.get(name)).unwrap_or(&Value::Null);
        write_value(property, topic, out);
    }
    out.push('}');
}

/// A JSON value with `json.dumps` separators.
fn write_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(&Value::from(key.as_str()), out);
                out.push_str(": ");
                write_json(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
