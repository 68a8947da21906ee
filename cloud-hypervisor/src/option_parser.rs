// SPDX-License-Identifier: Apache-2.0

//! Cloud Hypervisor's option syntax: `boot=2,max=4`,
//! `path=/a/b,readonly=on`, `cmdline="console=ttyS0,115200"`,
//! `affinity=[0@[0-3],1@[4-7]]`.
//!
//! This is written by hand because no published crate parses this syntax:
//! it is Cloud Hypervisor's own, and being a drop-in replacement means
//! accepting exactly the strings users already pass to it.
//!
//! The rules:
//! - options are separated by commas that are neither inside double quotes
//!   nor inside `[...]` brackets (brackets nest);
//! - an option is `key=value`, or a bare `key` where the caller registered
//!   it with [`OptionParser::add_valueless`]; everything after the first `=`
//!   belongs to the value;
//! - double quotes outside brackets are removed, and what they enclose is
//!   kept as is (commas, `=`, brackets, surrounding spaces); there is no
//!   escape for a double quote itself, as in Cloud Hypervisor;
//! - inside brackets quotes are kept, so that [`StringList`] can still tell
//!   which commas separate items;
//! - an empty value (`key=` or `key=""`) counts as given but empty, and
//!   [`OptionParser::get`] and [`OptionParser::convert`] treat it as absent,
//!   which is what Cloud Hypervisor does (`--net mac=` means "the default
//!   MAC").

use std::collections::HashMap;
use std::path::PathBuf;

use thiserror::Error;

/// Why an option string was refused. The messages are one line and name the
/// option, because callers prefix them with the flag and the whole value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionParserError {
    #[error("unknown option \"{key}\" (valid options: {valid})")]
    UnknownOption { key: String, valid: String },
    #[error("option \"{0}\" is given more than once")]
    Duplicate(String),
    #[error("option \"{0}\" needs a value: {0}=<value>")]
    MissingValue(String),
    #[error("option \"{0}\" takes no value")]
    UnexpectedValue(String),
    #[error("empty option (two commas in a row, or a leading or trailing comma)")]
    EmptyOption,
    #[error("missing option name before \"=\"")]
    MissingKey,
    #[error("double quotes are only allowed in values")]
    QuoteInKey,
    #[error("unclosed double quote")]
    UnclosedQuote,
    #[error("unbalanced \"[\" and \"]\"")]
    UnbalancedBrackets,
    #[error("{key} must be {expected}")]
    InvalidValue { key: String, expected: String },
}

/// Whether a registered option is written `key=value` or as a bare `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arity {
    Value,
    Bare,
}

/// One `key[=value]` piece of an option string, before it is checked
/// against the registered options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOption {
    pub key: String,
    pub value: Option<String>,
}

/// A parser for one flag's value; register the options it takes, parse, then
/// read them back typed.
///
/// ```
/// use cloud_hypervisor::option_parser::OptionParser;
/// let mut parser = OptionParser::new();
/// parser.add("boot").add("max");
/// parser.parse("boot=2,max=4").unwrap();
/// assert_eq!(parser.convert::<u8>("boot").unwrap(), Some(2));
/// ```
#[derive(Clone, Debug, Default)]
pub struct OptionParser {
    /// Registered options in registration order, which is the order the
    /// "valid options" list of an error shows them in.
    options: Vec<(String, Arity)>,
    values: HashMap<String, String>,
}

impl OptionParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an option written `key=value`.
    pub fn add(&mut self, key: &str) -> &mut Self {
        self.register(key, Arity::Value)
    }

    /// Registers an option written as a bare `key`, like `off` in
    /// `--serial off`.
    pub fn add_valueless(&mut self, key: &str) -> &mut Self {
        self.register(key, Arity::Bare)
    }

    fn register(&mut self, key: &str, arity: Arity) -> &mut Self {
        match self.options.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = arity,
            None => self.options.push((key.to_owned(), arity)),
        }
        self
    }

    /// Parses `input`, replacing whatever an earlier call parsed. On error
    /// nothing is kept, so a caller never acts on half an option string.
    pub fn parse(&mut self, input: &str) -> Result<(), OptionParserError> {
        self.values.clear();
        let mut values = HashMap::new();
        for raw in split_options(input)? {
            let Some(&(_, arity)) = self.options.iter().find(|(k, _)| *k == raw.key) else {
                return Err(OptionParserError::UnknownOption {
                    key: raw.key,
                    valid: self.valid_options(),
                });
            };
            let value = match (arity, raw.value) {
                (Arity::Value, Some(value)) => value,
                (Arity::Value, None) => return Err(OptionParserError::MissingValue(raw.key)),
                (Arity::Bare, None) => String::new(),
                (Arity::Bare, Some(_)) => {
                    return Err(OptionParserError::UnexpectedValue(raw.key));
                }
            };
            if values.contains_key(&raw.key) {
                return Err(OptionParserError::Duplicate(raw.key));
            }
            values.insert(raw.key, value);
        }
        self.values = values;
        Ok(())
    }

    fn valid_options(&self) -> String {
        self.options
            .iter()
            .map(|(key, _)| key.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether `key` appeared in the parsed string, even with an empty value.
    pub fn is_set(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The value of `key`; `None` when it was not given or given empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The value of `key` converted to `T`; `Ok(None)` when it was not given
    /// or given empty.
    pub fn convert<T: OptionValue>(&self, key: &str) -> Result<Option<T>, OptionParserError> {
        self.get(key)
            .map(|value| {
                T::parse_option(value).map_err(|expected| OptionParserError::InvalidValue {
                    key: key.to_owned(),
                    expected,
                })
            })
            .transpose()
    }

    /// The options that were given, in registration order.
    pub fn given(&self) -> Vec<&str> {
        self.options
            .iter()
            .map(|(key, _)| key.as_str())
            .filter(|key| self.is_set(key))
            .collect()
    }
}

/// Splits `input` on top-level commas and each piece on its first top-level
/// `=`, removing quotes outside brackets. An empty (or all-blank) input has
/// no options.
pub fn split_options(input: &str) -> Result<Vec<RawOption>, OptionParserError> {
    let input = input.trim();
    if input.is_empty() {
        return Ok(Vec::new());
    }

    let mut pieces = Vec::new();
    let mut key = String::new();
    let mut value: Option<String> = None;
    let mut quoted = false;
    let mut in_quotes = false;
    let mut depth = 0usize;

    for c in input.chars() {
        if in_quotes {
            if c == '"' {
                in_quotes = false;
                if depth == 0 {
                    continue;
                }
            }
        } else {
            match c {
                '"' => {
                    if value.is_none() {
                        return Err(OptionParserError::QuoteInKey);
                    }
                    in_quotes = true;
                    quoted = true;
                    if depth == 0 {
                        continue;
                    }
                }
                '[' => depth += 1,
                ']' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or(OptionParserError::UnbalancedBrackets)?;
                }
                ',' if depth == 0 => {
                    pieces.push(finish_option(&key, value.take(), quoted)?);
                    key.clear();
                    quoted = false;
                    continue;
                }
                '=' if depth == 0 && value.is_none() => {
                    value = Some(String::new());
                    continue;
                }
                _ => {}
            }
        }
        match value.as_mut() {
            Some(value) => value.push(c),
            None => key.push(c),
        }
    }
    if in_quotes {
        return Err(OptionParserError::UnclosedQuote);
    }
    if depth != 0 {
        return Err(OptionParserError::UnbalancedBrackets);
    }
    pieces.push(finish_option(&key, value, quoted)?);
    Ok(pieces)
}

fn finish_option(
    key: &str,
    value: Option<String>,
    quoted: bool,
) -> Result<RawOption, OptionParserError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(if value.is_some() {
            OptionParserError::MissingKey
        } else {
            OptionParserError::EmptyOption
        });
    }
    // Spaces around an unquoted value are a typing accident; inside quotes
    // they were asked for.
    let value = value.map(|v| if quoted { v } else { v.trim().to_owned() });
    Ok(RawOption {
        key: key.to_owned(),
        value,
    })
}

/// Splits the inside of a `[...]` list on commas that are not nested in
/// brackets or quotes, removing one level of quotes from each item. The
/// outer brackets are optional, as in Cloud Hypervisor.
pub fn split_list(input: &str) -> Result<Vec<String>, OptionParserError> {
    let input = input.trim();
    let body = match input.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or(OptionParserError::UnbalancedBrackets)?,
        None => input,
    };
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut items = Vec::new();
    let mut item = String::new();
    let mut in_quotes = false;
    let mut depth = 0usize;
    for c in body.chars() {
        match c {
            '"' if depth == 0 => {
                in_quotes = !in_quotes;
                continue;
            }
            _ if in_quotes => {}
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or(OptionParserError::UnbalancedBrackets)?;
            }
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    if in_quotes {
        return Err(OptionParserError::UnclosedQuote);
    }
    if depth != 0 {
        return Err(OptionParserError::UnbalancedBrackets);
    }
    items.push(item);
    Ok(items)
}

/// Wraps `value` in double quotes when it would otherwise not survive
/// parsing unchanged; for building option strings (e.g. for a remote call).
/// Values containing a double quote cannot be expressed in this syntax.
pub fn quote_value(value: &str) -> String {
    let needs_quotes =
        value.is_empty() || value.trim() != value || value.contains([',', '=', '[', ']']);
    if needs_quotes {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

/// A type an option value converts to. The error is a description of what
/// was expected, completing the sentence "`key` must be ...".
pub trait OptionValue: Sized {
    fn parse_option(value: &str) -> Result<Self, String>;
}

macro_rules! integer_option_value {
    ($($t:ty),*) => {$(
        impl OptionValue for $t {
            fn parse_option(value: &str) -> Result<Self, String> {
                value.parse::<$t>().map_err(|_| {
                    if value.parse::<i128>().is_ok() {
                        format!("an integer from {} to {}", <$t>::MIN, <$t>::MAX)
                    } else {
                        "an integer".to_owned()
                    }
                })
            }
        }
    )*};
}

integer_option_value!(u8, u16, u32, u64, usize, i32, i64);

/// `on`/`off`/`true`/`false`, in any case, as Cloud Hypervisor accepts.
impl OptionValue for bool {
    fn parse_option(value: &str) -> Result<Self, String> {
        match value.to_ascii_lowercase().as_str() {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err("on, off, true or false".to_owned()),
        }
    }
}

impl OptionValue for String {
    fn parse_option(value: &str) -> Result<Self, String> {
        Ok(value.to_owned())
    }
}

impl OptionValue for PathBuf {
    fn parse_option(value: &str) -> Result<Self, String> {
        Ok(PathBuf::from(value))
    }
}

/// A byte count written as plain bytes or with a K, M, G or T suffix
/// (powers of 1024, like Cloud Hypervisor's `128M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl OptionValue for ByteSize {
    fn parse_option(value: &str) -> Result<Self, String> {
        let expected = || "a size in bytes, optionally with a K, M, G or T suffix".to_owned();
        let value = value.trim();
        let (digits, shift) = match value.char_indices().last() {
            Some((at, 'K' | 'k')) => (&value[..at], 10),
            Some((at, 'M' | 'm')) => (&value[..at], 20),
            Some((at, 'G' | 'g')) => (&value[..at], 30),
            Some((at, 'T' | 't')) => (&value[..at], 40),
            _ => (value, 0),
        };
        // `u64::from_str` takes a leading `+`, which no size is written with.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(expected());
        }
        let number: u64 = digits.parse().map_err(|_| expected())?;
        number
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{} (at most {} bytes)", expected(), u64::MAX))
    }
}

/// Most entries an [`IntegerList`] expands to; a range like `0-4000000000`
/// is a typo, and expanding it would exhaust memory.
pub const MAX_LIST_ENTRIES: usize = 4096;

/// A list of integers and inclusive ranges, `[0,2-5]` or `0,2-5`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegerList(pub Vec<u64>);

impl OptionValue for IntegerList {
    fn parse_option(value: &str) -> Result<Self, String> {
        let expected = || "a list of integers and ranges like [0,2-5]".to_owned();
        let items = split_list(value).map_err(|_| expected())?;
        let mut list = Vec::new();
        for item in items {
            let item = item.trim();
            let (start, end) = match item.split_once('-') {
                Some((start, end)) => (start, end),
                None => (item, item),
            };
            let parse = |s: &str| -> Result<u64, String> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(expected());
                }
                s.parse().map_err(|_| expected())
            };
            let (start, end) = (parse(start)?, parse(end)?);
            if start > end {
                return Err(format!("{} (range {start}-{end} is backwards)", expected()));
            }
            let count = usize::try_from(end - start)
                .ok()
                .and_then(|n| n.checked_add(1))
                .filter(|n| list.len().saturating_add(*n) <= MAX_LIST_ENTRIES);
            if count.is_none() {
                return Err(format!(
                    "{} (at most {MAX_LIST_ENTRIES} entries)",
                    expected()
                ));
            }
            list.extend(start..=end);
        }
        Ok(IntegerList(list))
    }
}

/// A list of strings, `[a,b,"c,d"]` or `a,b`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl OptionValue for StringList {
    fn parse_option(value: &str) -> Result<Self, String> {
        split_list(value)
            .map(StringList)
            .map_err(|e| format!("a list like [a,b] ({e})"))
    }
}

/// Cloud Hypervisor's `<index>@<integer list>` pairs, `[0@[0-3],1@[4,5]]` (vCPU affinity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexedLists(pub Vec<(u32, Vec<u64>)>);

impl OptionValue for IndexedLists {
    fn parse_option(value: &str) -> Result<Self, String> {
        let expected = || "a list of <index>@[<integers and ranges>] like [0@[0-3],1@[4,5]]";
        let items = split_list(value).map_err(|e| format!("{} ({e})", expected()))?;
        let mut pairs = Vec::new();
        for item in items {
            let (index, list) = item
                .trim()
                .split_once('@')
                .ok_or_else(|| format!("{} (\"{item}\" has no @)", expected()))?;
            let index = u32::parse_option(index.trim())
                .map_err(|why| format!("{} (index \"{index}\" must be {why})", expected()))?;
            let IntegerList(list) = IntegerList::parse_option(list)?;
            pairs.push((index, list));
        }
        Ok(IndexedLists(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn indexed_lists_parse_cloud_hypervisor_affinity() {
        assert_eq!(
            IndexedLists::parse_option("[0@[0-2],1@[4,6-7]]"),
            Ok(IndexedLists(vec![(0, vec![0, 1, 2]), (1, vec![4, 6, 7])]))
        );
        assert_eq!(IndexedLists::parse_option("[]"), Ok(IndexedLists(vec![])));
        for bad in ["[0[1]]", "[x@[1]]", "[0@[1-]]", "[0@[1]", "[-1@[0]]"] {
            assert!(IndexedLists::parse_option(bad).is_err(), "{bad}");
        }
    }

    fn parser(valued: &[&str], bare: &[&str]) -> OptionParser {
        let mut parser = OptionParser::new();
        for key in valued {
            parser.add(key);
        }
        for key in bare {
            parser.add_valueless(key);
        }
        parser
    }

    #[test]
    fn simple_pairs() {
        let mut p = parser(&["boot", "max"], &[]);
        p.parse("boot=2,max=4").unwrap();
        assert_eq!(p.get("boot"), Some("2"));
        assert_eq!(p.convert::<u8>("max").unwrap(), Some(4));
        assert!(p.is_set("boot"));
        assert_eq!(p.given(), vec!["boot", "max"]);

        p.parse("max=8").unwrap();
        assert!(!p.is_set("boot"), "a new parse starts afresh");
        assert_eq!(p.convert::<u8>("boot").unwrap(), None);
        assert_eq!(p.convert::<u8>("max").unwrap(), Some(8));
    }

    #[test]
    fn empty_input_sets_nothing() {
        let mut p = parser(&["boot"], &[]);
        p.parse("").unwrap();
        p.parse("   ").unwrap();
        assert!(!p.is_set("boot"));
        assert!(p.given().is_empty());
    }

    #[test]
    fn unknown_option_names_key_and_valid_ones() {
        let mut p = parser(&["boot", "max"], &["off"]);
        let err = p.parse("boot=1,bogus=2").unwrap_err();
        assert_eq!(
            err,
            OptionParserError::UnknownOption {
                key: "bogus".into(),
                valid: "boot, max, off".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown option \"bogus\" (valid options: boot, max, off)"
        );
        assert!(!p.is_set("boot"), "a failed parse keeps nothing");
    }

    #[test]
    fn duplicates_rejected() {
        let mut p = parser(&["boot"], &["off"]);
        assert_eq!(
            p.parse("boot=1,boot=2").unwrap_err(),
            OptionParserError::Duplicate("boot".into())
        );
        assert_eq!(
            p.parse("off,off").unwrap_err(),
            OptionParserError::Duplicate("off".into())
        );
    }

    #[test]
    fn bare_and_valued_keys() {
        let mut p = parser(&["file"], &["off", "tty"]);
        p.parse("tty").unwrap();
        assert!(p.is_set("tty"));
        assert_eq!(p.get("tty"), None);
        assert_eq!(
            p.parse("file").unwrap_err(),
            OptionParserError::MissingValue("file".into())
        );
        assert_eq!(
            p.parse("tty=on").unwrap_err(),
            OptionParserError::UnexpectedValue("tty".into())
        );
        p.parse("file=/tmp/log").unwrap();
        assert_eq!(
            p.convert::<PathBuf>("file").unwrap(),
            Some("/tmp/log".into())
        );
    }

    #[test]
    fn empty_values_count_as_absent() {
        let mut p = parser(&["mac", "cmdline"], &[]);
        p.parse("mac=").unwrap();
        assert!(p.is_set("mac"));
        assert_eq!(p.get("mac"), None);
        assert_eq!(p.convert::<u64>("mac").unwrap(), None);
        p.parse("cmdline=\"\"").unwrap();
        assert!(p.is_set("cmdline"));
        assert_eq!(p.get("cmdline"), None);
    }

    #[test]
    fn malformed_pieces() {
        let mut p = parser(&["a", "b"], &[]);
        for (input, err) in [
            ("a=1,,b=2", OptionParserError::EmptyOption),
            ("a=1,", OptionParserError::EmptyOption),
            (",a=1", OptionParserError::EmptyOption),
            ("=1", OptionParserError::MissingKey),
            ("\"a\"=1", OptionParserError::QuoteInKey),
            ("a=\"1", OptionParserError::UnclosedQuote),
            ("a=[1,2", OptionParserError::UnbalancedBrackets),
            ("a=1]", OptionParserError::UnbalancedBrackets),
            ("a=[[[]]]]", OptionParserError::UnbalancedBrackets),
        ] {
            assert_eq!(p.parse(input).unwrap_err(), err, "{input}");
        }
    }

    #[test]
    fn quotes_keep_commas_and_equals() {
        let mut p = parser(&["cmdline", "path"], &[]);
        p.parse("cmdline=\"console=ttyS0,115200 root=/dev/vda\",path=/x")
            .unwrap();
        assert_eq!(p.get("cmdline"), Some("console=ttyS0,115200 root=/dev/vda"));
        assert_eq!(p.get("path"), Some("/x"));

        p.parse("path=\" spaced [odd] \"").unwrap();
        assert_eq!(p.get("path"), Some(" spaced [odd] "));

        p.parse("path=/a\"b,c\"d").unwrap();
        assert_eq!(p.get("path"), Some("/ab,cd"));

        // Everything after the first `=` is the value.
        p.parse("cmdline=a=b=c").unwrap();
        assert_eq!(p.get("cmdline"), Some("a=b=c"));
    }

    #[test]
    fn whitespace_around_unquoted_parts_is_trimmed() {
        let mut p = parser(&["boot", "max"], &[]);
        p.parse(" boot = 2 , max=4 ").unwrap();
        assert_eq!(p.convert::<u8>("boot").unwrap(), Some(2));
        assert_eq!(p.convert::<u8>("max").unwrap(), Some(4));
    }

    #[test]
    fn brackets_keep_commas() {
        let mut p = parser(&["topology", "affinity", "size"], &[]);
        p.parse("size=1G,topology=[1,2],affinity=[0@[0-3],1@[4,5]]")
            .unwrap();
        assert_eq!(p.get("topology"), Some("[1,2]"));
        assert_eq!(p.get("affinity"), Some("[0@[0-3],1@[4,5]]"));
        assert_eq!(
            p.convert::<ByteSize>("size").unwrap(),
            Some(ByteSize(1 << 30))
        );
        p.parse("topology=[[1,2],[3,4]]").unwrap();
        assert_eq!(p.get("topology"), Some("[[1,2],[3,4]]"));
        // A quoted `[` does not open a bracket.
        p.parse("topology=\"[\"").unwrap();
        assert_eq!(p.get("topology"), Some("["));
    }

    #[test]
    fn integers() {
        let mut p = parser(&["boot", "fd"], &[]);
        p.parse("boot=x").unwrap();
        let err = p.convert::<u8>("boot").unwrap_err();
        assert_eq!(err.to_string(), "boot must be an integer");
        p.parse("boot=256").unwrap();
        assert_eq!(
            p.convert::<u8>("boot").unwrap_err().to_string(),
            "boot must be an integer from 0 to 255"
        );
        p.parse("boot=-1").unwrap();
        assert!(p.convert::<u8>("boot").is_err());
        p.parse("fd=-1").unwrap();
        assert_eq!(p.convert::<i32>("fd").unwrap(), Some(-1));
        p.parse("boot=99999999999999999999999999999999999999999")
            .unwrap();
        assert_eq!(
            p.convert::<u64>("boot").unwrap_err().to_string(),
            "boot must be an integer"
        );
    }

    #[test]
    fn booleans() {
        let mut p = parser(&["shared"], &[]);
        for (input, expected) in [
            ("on", true),
            ("off", false),
            ("true", true),
            ("false", false),
            ("ON", true),
            ("False", false),
        ] {
            p.parse(&format!("shared={input}")).unwrap();
            assert_eq!(p.convert::<bool>("shared").unwrap(), Some(expected));
        }
        p.parse("shared=yes").unwrap();
        assert_eq!(
            p.convert::<bool>("shared").unwrap_err().to_string(),
            "shared must be on, off, true or false"
        );
    }

    #[test]
    fn sizes() {
        for (input, expected) in [
            ("0", 0),
            ("4096", 4096),
            ("1K", 1 << 10),
            ("128M", 128 << 20),
            ("128m", 128 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("16777215T", 16_777_215u64 << 40),
        ] {
            assert_eq!(
                ByteSize::parse_option(input),
                Ok(ByteSize(expected)),
                "{input}"
            );
        }
        for input in [
            "",
            "M",
            "1.5G",
            "-1M",
            "+1M",
            "1 G",
            "1GB",
            "1X",
            "16777216T",
        ] {
            assert!(ByteSize::parse_option(input).is_err(), "{input}");
        }
    }

    #[test]
    fn integer_lists() {
        assert_eq!(
            IntegerList::parse_option("[0,2-5,9]"),
            Ok(IntegerList(vec![0, 2, 3, 4, 5, 9]))
        );
        assert_eq!(IntegerList::parse_option("1-1"), Ok(IntegerList(vec![1])));
        assert_eq!(IntegerList::parse_option("[]"), Ok(IntegerList(vec![])));
        for bad in [
            "[5-2]",
            "[a]",
            "[1-2-3]",
            "[1,]",
            "[0-100000]",
            "[1",
            "[-1]",
        ] {
            assert!(IntegerList::parse_option(bad).is_err(), "{bad}");
        }
        let mut p = parser(&["cpus"], &[]);
        p.parse("cpus=[0-3]").unwrap();
        assert_eq!(
            p.convert::<IntegerList>("cpus").unwrap(),
            Some(IntegerList(vec![0, 1, 2, 3]))
        );
    }

    #[test]
    fn string_lists() {
        assert_eq!(
            StringList::parse_option("[a,b,\"c,d\"]"),
            Ok(StringList(vec!["a".into(), "b".into(), "c,d".into()]))
        );
        assert_eq!(
            StringList::parse_option("x,y"),
            Ok(StringList(vec!["x".into(), "y".into()]))
        );
        assert_eq!(
            StringList::parse_option("[[1,2],[3]]"),
            Ok(StringList(vec!["[1,2]".into(), "[3]".into()]))
        );
        assert!(StringList::parse_option("[a,\"b]").is_err());
        let mut p = parser(&["zones"], &[]);
        p.parse("zones=[mem0,\"mem,1\"]").unwrap();
        assert_eq!(
            p.convert::<StringList>("zones").unwrap(),
            Some(StringList(vec!["mem0".into(), "mem,1".into()]))
        );
    }

    #[test]
    fn quote_value_only_when_needed() {
        assert_eq!(quote_value("/a/b"), "/a/b");
        assert_eq!(quote_value("a,b"), "\"a,b\"");
        assert_eq!(quote_value("a=b"), "\"a=b\"");
        assert_eq!(quote_value(" a"), "\" a\"");
        assert_eq!(quote_value(""), "\"\"");
    }

    #[test]
    fn reregistering_a_key_keeps_one_entry() {
        let mut p = OptionParser::new();
        p.add("a").add_valueless("a");
        p.parse("a").unwrap();
        let err = p.parse("b").unwrap_err();
        assert_eq!(
            err,
            OptionParserError::UnknownOption {
                key: "b".into(),
                valid: "a".into()
            }
        );
    }

    const KEYS: [&str; 6] = ["boot", "max", "path", "size", "cmdline", "id"];

    fn full_parser() -> OptionParser {
        let mut p = parser(&KEYS, &["off", "tty"]);
        p.add("list");
        p
    }

    proptest! {
        #[test]
        fn never_panics(input in any::<String>()) {
            let mut p = full_parser();
            if p.parse(&input).is_ok() {
                for key in KEYS.iter().chain(["list", "off", "tty"].iter()) {
                    let _ = p.convert::<u8>(key);
                    let _ = p.convert::<i64>(key);
                    let _ = p.convert::<bool>(key);
                    let _ = p.convert::<ByteSize>(key);
                    let _ = p.convert::<IntegerList>(key);
                    let _ = p.convert::<StringList>(key);
                }
            }
        }

        #[test]
        fn never_panics_on_syntax_like_input(input in "[a-z=,\\[\\]\" 0-9@-]{0,40}") {
            let mut p = full_parser();
            let _ = p.parse(&input);
            let _ = split_list(&input);
            let _ = IntegerList::parse_option(&input);
            let _ = ByteSize::parse_option(&input);
        }

        #[test]
        fn round_trip(
            entries in proptest::sample::subsequence(KEYS.to_vec(), 0..=KEYS.len())
                .prop_shuffle()
                .prop_flat_map(|keys| {
                    let n = keys.len();
                    (
                        Just(keys),
                        proptest::collection::vec("[a-zA-Z0-9/._ ,=:\\[\\]-]{0,16}", n),
                        proptest::sample::select(vec![false, true]),
                    )
                })
        ) {
            let (keys, values, bare_tty) = entries;
            let mut pieces: Vec<String> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("{k}={}", quote_value(v)))
                .collect();
            if bare_tty {
                pieces.push("tty".to_owned());
            }
            let input = pieces.join(",");
            let mut p = full_parser();
            p.parse(&input).map_err(|e| TestCaseError::fail(format!("{input}: {e}")))?;
            for (k, v) in keys.iter().zip(&values) {
                prop_assert!(p.is_set(k));
                prop_assert_eq!(p.get(k), Some(v.as_str()).filter(|v| !v.is_empty()));
            }
            prop_assert_eq!(p.is_set("tty"), bare_tty);
            prop_assert_eq!(p.given().len(), keys.len() + usize::from(bare_tty));
        }

        #[test]
        fn sizes_round_trip(n in 0u64..(1 << 20), suffix in 0usize..5) {
            let (text, shift) = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)][suffix];
            prop_assert_eq!(
                ByteSize::parse_option(&format!("{n}{text}")),
                Ok(ByteSize(n << shift))
            );
        }

        #[test]
        fn integer_lists_round_trip(items in proptest::collection::vec((0u64..1000, 0u64..8), 0..8)) {
            let text = items
                .iter()
                .map(|(start, len)| if *len == 0 { start.to_string() } else { format!("{start}-{}", start + len) })
                .collect::<Vec<_>>()
                .join(",");
            let expected: Vec<u64> = items.iter().flat_map(|(s, l)| *s..=s + l).collect();
            let mut p = parser(&["list"], &[]);
            p.parse(&format!("list=[{text}]")).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = p.convert::<IntegerList>("list").map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got.unwrap_or(IntegerList(Vec::new())), IntegerList(expected));
        }
    }
}
