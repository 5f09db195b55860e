//! The Python package's view of the public contract, `python/connredir/_abi.py`.
//!
//! Made from the bindings bindgen gives for `uapi.h` (the same text as
//! `crates/abi/src/generated/uapi.rs`), not from the header again: bindgen
//! has already evaluated the macros and laid out every struct, and its
//! layout assertions (size, alignment, each field's offset) are the ones the
//! Rust compiler checks. So Python gets the option numbers and offsets the
//! Rust crates are built with, and no number is copied by hand.
//!
//! Only the forms bindgen writes for `uapi.h` are read: integer constants,
//! `#[repr(C)]` structs of integers, integer arrays and other structs, and
//! the layout assertions. Anything else there is an error, so a header
//! that grows a new kind of item fails here instead of being left out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{abi_dir, Error, COMMAND};

/// The header the Python module is made from.
pub const HEADER: &str = "uapi.h";

/// Where the Python module is kept: `python/connredir/_abi.py`.
pub fn python_output_path() -> PathBuf {
    abi_dir()
        .parent()
        .and_then(|crates| crates.parent())
        .expect("crates/abi lives two levels below the repository root")
        .join("python/connredir/_abi.py")
}

/// The Python text of `_abi.py`, as it should be committed.
pub fn generate_python() -> Result<String, Error> {
    let binding = crate::BINDINGS
        .iter()
        .find(|b| b.header == HEADER)
        .expect("uapi.h is one of the bindings");
    let rust = crate::generate(binding)?;
    let api = Api::parse(&rust)?;
    api.render()
}

/// A token of bindgen's output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An identifier or a number (with its suffix, e.g. `24usize`).
    Word(String),
    /// A string literal's contents.
    Str(String),
    /// Any other character.
    Punct(char),
}

/// Splits bindgen's output into tokens; comments are dropped.
fn tokenize(text: &str) -> Result<Vec<Token>, Error> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '/' {
            chars.next();
            if chars.peek() == Some(&'/') {
                // A line comment (the generated-file note).
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            } else {
                tokens.push(Token::Punct('/'));
            }
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => s.extend(chars.next()),
                    Some(c) => s.push(c),
                    None => return Err(Error("unterminated string in bindgen's output".into())),
                }
            }
            tokens.push(Token::Str(s));
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    w.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            tokens.push(Token::Word(w));
        } else {
            tokens.push(Token::Punct(c));
            chars.next();
        }
    }
    Ok(tokens)
}

/// The number a bindgen literal spells (`24usize`, `4410962`).
fn number(word: &str) -> Result<u64, Error> {
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    let suffix = &word[digits.len()..];
    if digits.is_empty() || !matches!(suffix, "" | "usize" | "u32" | "u64" | "u16" | "u8") {
        return Err(Error(format!("{word:?} is not a decimal literal")));
    }
    digits
        .parse()
        .map_err(|e| Error(format!("{word:?} is not a number: {e}")))
}

/// A field's type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldType {
    /// `u8` .. `u64`.
    Scalar(&'static str, usize),
    /// Another struct of the header.
    Struct(String),
}

impl FieldType {
    fn from_name(name: &str) -> FieldType {
        match name {
            "u8" => FieldType::Scalar("u8", 1),
            "u16" => FieldType::Scalar("u16", 2),
            "u32" => FieldType::Scalar("u32", 4),
            "u64" => FieldType::Scalar("u64", 8),
            other => FieldType::Struct(other.to_string()),
        }
    }

    fn name(&self) -> &str {
        match self {
            FieldType::Scalar(name, _) => name,
            FieldType::Struct(name) => name,
        }
    }
}

/// One field as declared.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: FieldType,
    /// Elements: 1 unless an array.
    count: u64,
    /// Whether it is declared as an array (even of one element).
    array: bool,
}

/// One struct: its fields in order, and the layout bindgen asserts.
#[derive(Debug, Default)]
struct Struct {
    fields: Vec<Field>,
    size: Option<u64>,
    align: Option<u64>,
    offsets: BTreeMap<String, u64>,
}

/// What the Python module holds: constants and structs, in header order.
#[derive(Debug, Default)]
struct Api {
    constants: Vec<(String, String, u64)>,
    structs: Vec<(String, Struct)>,
}

/// Reads tokens one by one, with the expectations bindgen's forms give.
struct Cursor<'a> {
    tokens: &'a [Token],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<&Token, Error> {
        let t = self
            .tokens
            .get(self.at)
            .ok_or_else(|| Error("bindgen's output ends early".into()))?;
        self.at += 1;
        Ok(t)
    }

    fn word(&mut self) -> Result<String, Error> {
        match self.next()? {
            Token::Word(w) => Ok(w.clone()),
            other => Err(Error(format!("expected a name, found {other:?}"))),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), Error> {
        match self.next()? {
            Token::Punct(p) if *p == c => Ok(()),
            other => Err(Error(format!("expected {c:?}, found {other:?}"))),
        }
    }

    fn peek_is(&self, offset: usize, token: &Token) -> bool {
        self.tokens.get(self.at + offset) == Some(token)
    }
}

fn word(w: &str) -> Token {
    Token::Word(w.into())
}

impl Api {
    fn parse(rust: &str) -> Result<Api, Error> {
        let tokens = tokenize(rust)?;
        let mut api = Api::default();
        let mut c = Cursor {
            tokens: &tokens,
            at: 0,
        };
        while c.at < tokens.len() {
            if c.peek_is(0, &word("pub")) && c.peek_is(1, &word("const")) {
                c.at += 2;
                let name = c.word()?;
                c.punct(':')?;
                let ty = c.word()?;
                c.punct('=')?;
                let value = number(&c.word()?)?;
                c.punct(';')?;
                api.constants.push((name, ty, value));
            } else if c.peek_is(0, &word("pub")) && c.peek_is(1, &word("struct")) {
                c.at += 2;
                let name = c.word()?;
                c.punct('{')?;
                let mut s = Struct::default();
                while !c.peek_is(0, &Token::Punct('}')) {
                    if c.word()? != "pub" {
                        return Err(Error(format!("a field of {name} is not public")));
                    }
                    let field = c.word()?;
                    c.punct(':')?;
                    let (ty, count, array) = if c.peek_is(0, &Token::Punct('[')) {
                        c.punct('[')?;
                        let ty = c.word()?;
                        c.punct(';')?;
                        let count = number(&c.word()?)?;
                        c.punct(']')?;
                        (ty, count, true)
                    } else {
                        (c.word()?, 1, false)
                    };
                    c.punct(',')?;
                    s.fields.push(Field {
                        name: field,
                        ty: FieldType::from_name(&ty),
                        count,
                        array,
                    });
                }
                c.punct('}')?;
                api.structs.push((name, s));
            } else if let Token::Str(text) = &tokens[c.at] {
                let text = text.clone();
                c.at += 1;
                api.assertion(&text, &mut c)?;
            } else {
                c.at += 1;
            }
        }
        Ok(api)
    }

    /// Takes the number of a layout assertion: `["TEXT"][EXPR - Nusize];`.
    fn assertion(&mut self, text: &str, c: &mut Cursor<'_>) -> Result<(), Error> {
        let (what, subject) = if let Some(s) = text.strip_prefix("Size of ") {
            ("size", s.to_string())
        } else if let Some(s) = text.strip_prefix("Alignment of ") {
            ("align", s.to_string())
        } else if let Some(s) = text.strip_prefix("Offset of field: ") {
            ("offset", s.to_string())
        } else {
            return Ok(());
        };
        // The value is the number after the last `-` before `];`.
        let mut value = None;
        loop {
            match c.next()? {
                Token::Punct('-') => {
                    if let Token::Word(w) = c.next()? {
                        value = Some(number(w)?);
                    }
                }
                Token::Punct(';') => break,
                _ => {}
            }
        }
        let value = value.ok_or_else(|| Error(format!("no value in the assertion {text:?}")))?;
        let (name, field) = match subject.split_once("::") {
            Some((s, f)) => (s.to_string(), Some(f.to_string())),
            None => (subject, None),
        };
        let s = self
            .structs
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| Error(format!("{text:?} names no struct before it")))?;
        match (what, field) {
            ("size", None) => s.size = Some(value),
            ("align", None) => s.align = Some(value),
            ("offset", Some(field)) => {
                s.offsets.insert(field, value);
            }
            _ => return Err(Error(format!("unexpected assertion {text:?}"))),
        }
        Ok(())
    }

    /// Size in bytes of a type of this header.
    fn size_of(&self, ty: &FieldType) -> Result<u64, Error> {
        match ty {
            FieldType::Scalar(_, size) => Ok(*size as u64),
            FieldType::Struct(name) => self
                .structs
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, s)| s.size)
                .ok_or_else(|| {
                    Error(format!(
                        "{name} is not a struct of {HEADER} laid out before"
                    ))
                }),
        }
    }

    fn render(&self) -> Result<String, Error> {
        let mut out = String::new();
        out.push_str(&format!(
            "# Generated by connredir-abi-codegen from crates/abi/include/connredir/{HEADER}: do not edit.\n\
             # Change the header, then run `{COMMAND}` to rewrite this file.\n"
        ));
        out.push_str(PRELUDE);
        out.push_str("\n# ---- Constants (the header's macros).\n\n");
        for (name, ty, value) in &self.constants {
            if !matches!(ty.as_str(), "u8" | "u16" | "u32" | "u64" | "i32" | "i64") {
                return Err(Error(format!("constant {name} has type {ty}")));
            }
            out.push_str(&format!("{name} = {value}\n"));
        }
        out.push_str("\n# ---- Structs (each field at the offset the C compiler gives it).\n");
        let mut names = Vec::new();
        for (name, s) in &self.structs {
            out.push_str(&self.render_struct(name, s)?);
            names.push(name.as_str());
        }
        out.push_str("\n#: Every struct of the header, by its C name.\nLAYOUTS = {\n");
        for name in names {
            out.push_str(&format!("    {name:?}: {name},\n"));
        }
        out.push_str("}\n");
        Ok(out)
    }

    fn render_struct(&self, name: &str, s: &Struct) -> Result<String, Error> {
        let missing = |what: &str| Error(format!("bindgen asserted no {what} for {name}"));
        let size = s.size.ok_or_else(|| missing("size"))?;
        let align = s.align.ok_or_else(|| missing("alignment"))?;
        // '=': native byte order (every field is in host order; addresses
        // and ports are byte strings or network-order u16 as in C), no
        // implicit alignment: gaps are written out as padding.
        let mut format = String::from("=");
        let mut at = 0u64;
        let mut fields = String::new();
        for f in &s.fields {
            let offset = *s
                .offsets
                .get(&f.name)
                .ok_or_else(|| missing(&format!("offset of {}", f.name)))?;
            if offset < at {
                return Err(Error(format!(
                    "{name}.{} at {offset} overlaps the field before",
                    f.name
                )));
            }
            if offset > at {
                format.push_str(&format!("{}x", offset - at));
            }
            let bytes = self.size_of(&f.ty)? * f.count;
            match (&f.ty, f.array) {
                (FieldType::Scalar(ty, _), false) => format.push(match *ty {
                    "u8" => 'B',
                    "u16" => 'H',
                    "u32" => 'I',
                    _ => 'Q',
                }),
                // Arrays and nested structs are one byte string each, read
                // with their own layout.
                _ => format.push_str(&format!("{bytes}s")),
            }
            fields.push_str(&format!(
                "        Field({:?}, {offset}, {bytes}, {:?}, {}),\n",
                f.name,
                f.ty.name(),
                f.count
            ));
            at = offset + bytes;
        }
        if at > size {
            return Err(Error(format!("{name}'s fields end past its size {size}")));
        }
        if size > at {
            format.push_str(&format!("{}x", size - at));
        }
        Ok(format!(
            "\n#: struct {name}: {size} bytes, aligned to {align}.\n\
             {name} = Layout(\n    {name:?},\n    {size},\n    {align},\n    (\n{fields}    ),\n    struct.Struct({format:?}),\n)\n"
        ))
    }
}

/// The module's docstring and the two types every layout is made of.
const PRELUDE: &str = r#""""The connredir user-space API for Python, from uapi.h: the socket option
level and numbers, and the layout of every struct a proxy reads or hands on.

Each struct is a `Layout`: its size, alignment, fields (name, offset, size,
element type, element count) and a `struct.Struct` that unpacks it into one
item per field, arrays and nested structs as byte strings.
"""

import struct
from typing import NamedTuple, Tuple


class Field(NamedTuple):
    """One field of a C struct."""

    #: The field's name in C.
    name: str
    #: Its offset from the start of the struct, in bytes.
    offset: int
    #: Its size in bytes, all elements together.
    size: int
    #: "u8", "u16", "u32", "u64", or the name of another struct.
    type: str
    #: How many elements: 1 unless the field is an array.
    count: int


class Layout(NamedTuple):
    """A C struct of the header."""

    #: The struct's name in C.
    name: str
    #: sizeof.
    size: int
    #: alignof.
    align: int
    #: The fields, in order.
    fields: Tuple[Field, ...]
    #: Unpacks the struct into one item per field.
    format: struct.Struct

    def field(self, name: str) -> Field:
        """The field called `name`."""
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def offset(self, name: str) -> int:
        """offsetof(struct, name)."""
        return self.field(name).offset
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_tokens() {
        assert_eq!(number("24usize").unwrap(), 24);
        assert_eq!(number("4410962").unwrap(), 4_410_962);
        assert!(number("0x10").is_err());
        assert!(number("usize").is_err());
        let tokens = tokenize("// note\n[\"Size of x\"][a - 2usize];").unwrap();
        assert_eq!(tokens[1], Token::Str("Size of x".into()));
        assert_eq!(tokens.len(), 9);
    }

    #[test]
    fn padding_is_written_out() {
        let rust = r#"
            pub const A: u32 = 7;
            pub struct s { pub x: u8, pub y: u32, pub z: [u8; 3usize], }
            const _: () = {
                ["Size of s"][::std::mem::size_of::<s>() - 12usize];
                ["Alignment of s"][::std::mem::align_of::<s>() - 4usize];
                ["Offset of field: s::x"][::std::mem::offset_of!(s, x) - 0usize];
                ["Offset of field: s::y"][::std::mem::offset_of!(s, y) - 4usize];
                ["Offset of field: s::z"][::std::mem::offset_of!(s, z) - 8usize];
            };
        "#;
        let text = Api::parse(rust).unwrap().render().unwrap();
        assert!(text.contains("\nA = 7\n"), "{text}");
        assert!(text.contains("struct.Struct(\"=B3xI3s1x\")"), "{text}");
        assert!(text.contains("Field(\"z\", 8, 3, \"u8\", 3)"), "{text}");
    }

    #[test]
    fn a_missing_offset_is_an_error() {
        let rust = r#"
            pub struct s { pub x: u8, }
            const _: () = { ["Size of s"][a - 1usize]; ["Alignment of s"][a - 1usize]; };
        "#;
        assert!(Api::parse(rust).unwrap().render().is_err());
    }
}
