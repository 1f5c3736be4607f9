//! The rendered job text as a tree of YAML nodes that remember where they were written.
//!
//! serde-based YAML crates forget positions once a value is built, yet every job error must say
//! where it is; so the schema is read from this tree instead (see `spec.rs`). The tree is built
//! from saphyr's event stream without recursion, with bounds on depth and on alias expansion
//! so that hostile input ("billion laughs", `[[[[…`) costs bounded time and memory.
//!
//! Scalars keep their text as written: the schema decides what a scalar means (a tag `1.0`
//! stays the string "1.0", `retries: 3` is an integer), which avoids the YAML 1.1/1.2
//! differences between PyYAML (valve-infra) and this parser on anything a job uses.

use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::error::Location;

/// Containers nested deeper than this are refused; a job is about six levels deep.
pub(crate) const MAX_DEPTH: usize = 64;
/// Nodes a document may expand to, aliases included.
pub(crate) const MAX_NODES: usize = 200_000;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null`, an empty value.
    Null,
    /// Any other scalar; `quoted` is false for plain scalars.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order, duplicates kept (the schema reports them).
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    /// Position in the rendered text.
    pub loc: Location,
    /// Nodes in this subtree (itself included) and its height, to bound alias expansion.
    size: usize,
    height: usize,
}

impl Node {
    fn leaf(value: Value, loc: Location) -> Self {
        Self {
            value,
            loc,
            size: 1,
            height: 1,
        }
    }

    fn container(value: Value, loc: Location) -> Self {
        let children: Box<dyn Iterator<Item = &Node>> = match &value {
            Value::Seq(items) => Box::new(items.iter()),
            Value::Map(entries) => Box::new(entries.iter().flat_map(|(k, v)| [k, v])),
            _ => Box::new(std::iter::empty()),
        };
        let (size, height) = children.fold((1, 0), |(s, h), c| (s + c.size, h.max(c.height)));
        Self {
            value,
            loc,
            size,
            height: height + 1,
        }
    }

    /// The scalar text of a key (`None` for a non-scalar key).
    pub fn as_key(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            Value::Null => Some(""),
            _ => None,
        }
    }

    /// A short name of the kind of value, for "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    pub message: String,
    pub loc: Location,
}

fn loc(span: &Span) -> Location {
    Location {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

enum Frame {
    Seq {
        loc: Location,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        loc: Location,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    nodes: usize,
}

impl Builder {
    /// Hands a finished node to its parent (or makes it the document).
    fn complete(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }

    fn count(&mut self, n: usize, at: Location) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(YamlError {
                message: format!("the document expands to more than {MAX_NODES} YAML nodes"),
                loc: at,
            });
        }
        Ok(())
    }

    fn open(&mut self, at: Location) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError {
                message: format!("YAML nested more than {MAX_DEPTH} levels deep"),
                loc: at,
            });
        }
        self.count(1, at)
    }
}

/// Parses one YAML document. An empty text is a null document.
pub(crate) fn parse(text: &str) -> Result<Node, YamlError> {
    let mut b = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        nodes: 0,
    };
    let mut documents = 0usize;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| YamlError {
            message: e.info().to_string(),
            loc: Location {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
        })?;
        let at = loc(&span);
        match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        message: "a job is a single YAML document; found a second one".into(),
                        loc: at,
                    });
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                b.count(1, at)?;
                let forced_str = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let plain = style == ScalarStyle::Plain;
                let value = if plain
                    && !forced_str
                    && matches!(&*text, "" | "~" | "null" | "Null" | "NULL")
                {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted: !plain || forced_str,
                    }
                };
                b.complete(Node::leaf(value, at), anchor);
            }
            Event::SequenceStart(anchor, _) => {
                b.open(at)?;
                b.stack.push(Frame::Seq {
                    loc: at,
                    anchor,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(anchor, _) => {
                b.open(at)?;
                b.stack.push(Frame::Map {
                    loc: at,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match b.stack.pop() {
                    Some(Frame::Seq { loc, anchor, items }) => {
                        (Node::container(Value::Seq(items), loc), anchor)
                    }
                    Some(Frame::Map {
                        loc,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node::container(Value::Map(merge_keys(entries)), loc),
                        anchor,
                    ),
                    None => {
                        return Err(YamlError {
                            message: "unbalanced YAML collection".into(),
                            loc: at,
                        });
                    }
                };
                b.complete(node, anchor);
            }
            Event::Alias(id) => {
                let Some(target) = b.anchors.get(&id) else {
                    return Err(YamlError {
                        message: "alias to an unknown anchor".into(),
                        loc: at,
                    });
                };
                if b.stack.len() + target.height > MAX_DEPTH {
                    return Err(YamlError {
                        message: format!("YAML nested more than {MAX_DEPTH} levels deep"),
                        loc: at,
                    });
                }
                let mut node = target.clone();
                b.count(node.size, at)?;
                // Errors about an aliased value point at the alias, where the user used it.
                node.loc = at;
                b.complete(node, 0);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
    Ok(b.root
        .unwrap_or_else(|| Node::leaf(Value::Null, Location { line: 1, column: 1 })))
}

/// Applies YAML merge keys (`<<: *defaults`), which PyYAML supports and job templates use to
/// share timeouts or deployments. Keys written in the mapping itself win over merged ones.
fn merge_keys(entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
    let is_merge =
        |k: &Node| matches!(&k.value, Value::Scalar { text, quoted: false } if text == "<<");
    if !entries.iter().any(|(k, _)| is_merge(k)) {
        return entries;
    }
    let mut own = Vec::with_capacity(entries.len());
    let mut sources = Vec::new();
    for (k, v) in entries {
        if is_merge(&k) {
            match v.value {
                Value::Seq(items) => sources.extend(items),
                // A merge of a non-mapping stays an ordinary entry, so the schema reports it.
                Value::Map(_) => sources.push(v),
                _ => own.push((k, v)),
            }
        } else {
            own.push((k, v));
        }
    }
    // Keys seen so far (non-scalar keys never match, as before), to keep merging linear.
    let mut present: HashSet<String> = own
        .iter()
        .filter_map(|(k, _)| k.as_key().map(str::to_string))
        .collect();
    for source in sources {
        match source.value {
            Value::Map(merged) => {
                for (k, v) in merged {
                    let new_key = k.as_key().is_none_or(|key| present.insert(key.to_string()));
                    if new_key {
                        own.push((k, v));
                    }
                }
            }
            _ => own.push((
                Node::leaf(
                    Value::Scalar {
                        text: "<<".into(),
                        quoted: false,
                    },
                    source.loc,
                ),
                source,
            )),
        }
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_keys(n: &Node) -> Vec<String> {
        match &n.value {
            Value::Map(e) => e
                .iter()
                .map(|(k, _)| k.as_key().unwrap().to_string())
                .collect(),
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  c: [x, 'y']\n").unwrap();
        let Value::Map(e) = &n.value else { panic!() };
        assert_eq!(e[1].0.loc, Location { line: 2, column: 1 });
        let Value::Map(inner) = &e[1].1.value else {
            panic!()
        };
        assert_eq!(inner[0].1.loc, Location { line: 3, column: 6 });
        let Value::Seq(items) = &inner[0].1.value else {
            panic!()
        };
        assert_eq!(
            items[1].value,
            Value::Scalar {
                text: "y".into(),
                quoted: true
            }
        );
    }

    #[test]
    fn nulls_and_empty_document() {
        assert_eq!(parse("").unwrap().value, Value::Null);
        let n = parse("a:\nb: ~\nc: 'null'\n").unwrap();
        let Value::Map(e) = &n.value else { panic!() };
        assert_eq!(e[0].1.value, Value::Null);
        assert_eq!(e[1].1.value, Value::Null);
        assert!(matches!(e[2].1.value, Value::Scalar { quoted: true, .. }));
    }

    #[test]
    fn merge_keys_and_aliases() {
        let n = parse("d: &d {x: 1, y: 2}\ne:\n  <<: *d\n  y: 3\n").unwrap();
        let Value::Map(e) = &n.value else { panic!() };
        assert_eq!(map_keys(&e[1].1), vec!["y", "x"]);
    }

    #[test]
    fn bounded_expansion_and_depth() {
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for name in ['b', 'c', 'd', 'e', 'f', 'g'] {
            laughs.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
            prev = name;
        }
        assert!(parse(&laughs).unwrap_err().message.contains("expands"));
        let deep = "[".repeat(1000);
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn second_document_is_an_error() {
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.loc.line, 2);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.loc.line >= 1, "{e:?}");
    }
}
