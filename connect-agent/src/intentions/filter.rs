//! `?filter=` on the intention list: the part of Consul's filter language
//! (go-bexpr) that makes sense for intentions.
//!
//! Supported: `Selector == "value"`, `!=`, `Selector contains "text"`,
//! `"value" in Selector`, `is empty` / `is not empty`, joined with `and`, `or`, `not`
//! and parentheses. Selectors are the intention's JSON fields (`SourceName`,
//! `DestinationName`, `Action`, `Precedence`, …) and `Meta.<key>`. Anything else is
//! refused with a message rather than ignored, so a filter never silently matches
//! more than the user asked for. Input is bounded in length and nesting.

use super::model::ApiIntention;

/// Longest filter accepted.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of `not` and parentheses; the parser recurses, so this bounds its
/// stack use whatever the input.
const MAX_DEPTH: usize = 32;

/// A filter the language subset cannot parse. The client is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to create boolean expression evaluator: {reason} (at byte {at})")]
pub struct FilterError {
    pub reason: String,
    pub at: usize,
}

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Compare { field: Field, op: Op, value: String },
    Empty { field: Field, negate: bool },
}

/// The comparisons of the subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equal,
    NotEqual,
    /// `Field contains "x"` or `"x" in Field`: substring.
    Contains,
}

/// A selectable field of an intention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Id,
    Description,
    SourceNs,
    SourceName,
    DestinationNs,
    DestinationName,
    SourceType,
    Action,
    Precedence,
    Meta(String),
}

impl Field {
    fn parse(s: &str) -> Option<Self> {
        if let Some(key) = s.strip_prefix("Meta.") {
            return (!key.is_empty()).then(|| Field::Meta(key.to_owned()));
        }
        Some(match s {
            "ID" => Field::Id,
            "Description" => Field::Description,
            "SourceNS" => Field::SourceNs,
            "SourceName" => Field::SourceName,
            "DestinationNS" => Field::DestinationNs,
            "DestinationName" => Field::DestinationName,
            "SourceType" => Field::SourceType,
            "Action" => Field::Action,
            "Precedence" => Field::Precedence,
            _ => return None,
        })
    }

    fn value(&self, i: &ApiIntention) -> String {
        match self {
            Field::Id => i.id.clone(),
            Field::Description => i.description.clone(),
            Field::SourceNs => i.source_ns.clone(),
            Field::SourceName => i.source_name.clone(),
            Field::DestinationNs => i.destination_ns.clone(),
            Field::DestinationName => i.destination_name.clone(),
            Field::SourceType => i.source_type.clone(),
            Field::Action => i.action.clone(),
            Field::Precedence => i.precedence.to_string(),
            Field::Meta(k) => i.meta.get(k).cloned().unwrap_or_default(),
        }
    }
}

impl Filter {
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        if s.len() > MAX_FILTER_LEN {
            return Err(FilterError {
                reason: format!("the filter is longer than {MAX_FILTER_LEN} bytes"),
                at: MAX_FILTER_LEN,
            });
        }
        let tokens = lex(s)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            end: s.len(),
        };
        let f = p.or(0)?;
        match p.peek() {
            None => Ok(f),
            Some((at, t)) => Err(FilterError {
                reason: format!("unexpected {}", t.describe()),
                at: *at,
            }),
        }
    }

    pub fn matches(&self, i: &ApiIntention) -> bool {
        match self {
            Filter::And(a, b) => a.matches(i) && b.matches(i),
            Filter::Or(a, b) => a.matches(i) || b.matches(i),
            Filter::Not(f) => !f.matches(i),
            Filter::Compare { field, op, value } => {
                let v = field.value(i);
                match op {
                    Op::Equal => v == *value,
                    Op::NotEqual => v != *value,
                    Op::Contains => v.contains(value.as_str()),
                }
            }
            Filter::Empty { field, negate } => field.value(i).is_empty() != *negate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Str(String),
    Eq,
    Ne,
    Open,
    Close,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Str(s) => format!("string {s:?}"),
            Token::Eq => "\"==\"".into(),
            Token::Ne => "\"!=\"".into(),
            Token::Open => "\"(\"".into(),
            Token::Close => "\")\"".into(),
        }
    }
}

fn lex(s: &str) -> Result<Vec<(usize, Token)>, FilterError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((i, Token::Open));
                i += 1;
            }
            b')' => {
                out.push((i, Token::Close));
                i += 1;
            }
            b'=' | b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((i, if c == b'=' { Token::Eq } else { Token::Ne }));
                i += 2;
            }
            b'"' | b'`' => {
                let start = i;
                let mut value = String::new();
                i += 1;
                loop {
                    let Some(&ch) = b.get(i) else {
                        return Err(FilterError {
                            reason: "unterminated string".into(),
                            at: start,
                        });
                    };
                    if ch == c {
                        i += 1;
                        break;
                    }
                    // Backslash escapes only in double quotes, as in Go.
                    if ch == b'\\' && c == b'"' {
                        match b.get(i + 1) {
                            Some(&e @ (b'"' | b'\\')) => {
                                value.push(e as char);
                                i += 2;
                                continue;
                            }
                            _ => {
                                return Err(FilterError {
                                    reason: "unsupported escape in string".into(),
                                    at: i,
                                });
                            }
                        }
                    }
                    // Copy one whole UTF-8 character.
                    let len = utf8_len(ch);
                    let end = (i + len).min(b.len());
                    value.push_str(&s[i..end]);
                    i = end;
                }
                out.push((start, Token::Str(value)));
            }
            _ if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'*' | b'/') => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || matches!(b[i], b'_' | b'.' | b'-' | b'*' | b'/'))
                {
                    i += 1;
                }
                out.push((start, Token::Word(s[start..i].to_owned())));
            }
            _ => {
                return Err(FilterError {
                    reason: format!(
                        "unexpected character {:?}",
                        s[i..].chars().next().unwrap_or('?')
                    ),
                    at: i,
                });
            }
        }
    }
    Ok(out)
}

/// The byte length of the UTF-8 character starting with `first`.
fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<(usize, Token)> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn at(&self) -> usize {
        self.peek().map_or(self.end, |(at, _)| *at)
    }

    fn err(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            reason: reason.into(),
            at: self.at(),
        }
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some((_, Token::Word(w))) if w == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut left = self.and(depth)?;
        while self.keyword("or") {
            let right = self.and(depth)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut left = self.unary(depth)?;
        while self.keyword("and") {
            let right = self.unary(depth)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth >= MAX_DEPTH {
            return Err(self.err(format!("expression nested deeper than {MAX_DEPTH}")));
        }
        if self.keyword("not") {
            return Ok(Filter::Not(Box::new(self.unary(depth + 1)?)));
        }
        if matches!(self.peek(), Some((_, Token::Open))) {
            self.pos += 1;
            let inner = self.or(depth + 1)?;
            return match self.next() {
                Some((_, Token::Close)) => Ok(inner),
                _ => Err(self.err("missing \")\"")),
            };
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Filter, FilterError> {
        let at = self.at();
        match self.next() {
            // "value" in Selector
            Some((_, Token::Str(value))) => {
                if !self.keyword("in") {
                    return Err(self.err("expected \"in\" after a string"));
                }
                let field = self.field()?;
                Ok(Filter::Compare {
                    field,
                    op: Op::Contains,
                    value,
                })
            }
            Some((_, Token::Word(w))) => {
                let field = Field::parse(&w).ok_or_else(|| FilterError {
                    reason: format!("unknown selector {w:?}"),
                    at,
                })?;
                match self.next() {
                    Some((_, Token::Eq)) => Ok(Filter::Compare {
                        field,
                        op: Op::Equal,
                        value: self.value()?,
                    }),
                    Some((_, Token::Ne)) => Ok(Filter::Compare {
                        field,
                        op: Op::NotEqual,
                        value: self.value()?,
                    }),
                    Some((_, Token::Word(kw))) if kw == "contains" => Ok(Filter::Compare {
                        field,
                        op: Op::Contains,
                        value: self.value()?,
                    }),
                    Some((_, Token::Word(kw))) if kw == "is" => {
                        let negate = self.keyword("not");
                        if !self.keyword("empty") {
                            return Err(self.err("expected \"empty\""));
                        }
                        Ok(Filter::Empty { field, negate })
                    }
                    _ => {
                        self.pos = self.pos.saturating_sub(1);
                        Err(self.err("expected ==, !=, contains or is [not] empty"))
                    }
                }
            }
            _ => Err(FilterError {
                reason: "expected a selector or a string".into(),
                at,
            }),
        }
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        let at = self.at();
        match self.next() {
            Some((_, Token::Word(w))) => Field::parse(&w).ok_or_else(|| FilterError {
                reason: format!("unknown selector {w:?}"),
                at,
            }),
            _ => Err(FilterError {
                reason: "expected a selector".into(),
                at,
            }),
        }
    }

    /// A quoted string, or a bare word (bexpr accepts unquoted values).
    fn value(&mut self) -> Result<String, FilterError> {
        let at = self.at();
        match self.next() {
            Some((_, Token::Str(s) | Token::Word(s))) => Ok(s),
            _ => Err(FilterError {
                reason: "expected a value".into(),
                at,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ixn(src: &str, dst: &str, action: &str) -> ApiIntention {
        ApiIntention {
            source_name: src.into(),
            destination_name: dst.into(),
            action: action.into(),
            precedence: 9,
            meta: [("team".to_owned(), "a".to_owned())].into(),
            ..ApiIntention::default()
        }
    }

    #[test]
    fn matching() {
        let i = ixn("web", "db", "deny");
        let cases = [
            (r#"SourceName == "web""#, true),
            (r#"SourceName == web"#, true),
            (r#"SourceName != "web""#, false),
            (r#"DestinationName == "db" and Action == "deny""#, true),
            (r#"DestinationName == "x" or Action == deny"#, true),
            (r#"not (Action == "allow")"#, true),
            (r#"not Action == "allow" and SourceName == "api""#, false),
            (r#"SourceName contains "e""#, true),
            (r#""we" in SourceName"#, true),
            (r#"Precedence == 9"#, true),
            (r#"Meta.team == "a""#, true),
            (r#"Meta.other is empty"#, true),
            (r#"Description is not empty"#, false),
            ("SourceName == `web`", true),
            (r#"SourceName == "w\"eb""#, false),
        ];
        for (f, want) in cases {
            let parsed = Filter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(parsed.matches(&i), want, "{f}");
        }
    }

    #[test]
    fn refused() {
        let deep = format!("{}Action == allow{}", "(".repeat(40), ")".repeat(40));
        let long = format!("Action == \"{}\"", "x".repeat(MAX_FILTER_LEN));
        for f in [
            "",
            "Action",
            "Action ==",
            "Action == allow and",
            "Bogus == x",
            "Action =~ allow",
            "(Action == allow",
            "Action == allow)",
            "\"x\" Action",
            "Action == \"unterminated",
            "Action is full",
            deep.as_str(),
            long.as_str(),
            "Meta. == x",
        ] {
            assert!(Filter::parse(f).is_err(), "{f:?} accepted");
        }
    }
}
