//! Limits on what a template may make envrender do: how deep it nests, how
//! partials include each other, how large a helper's result and the output
//! may grow. A template past one is an input error naming the template, the
//! line and the limit, found before anything is fetched when the template
//! alone passes it; never an abort, a stack overflow or a runaway.

use std::collections::HashMap;
use std::io;

use handlebars::template::{Parameter, Template, TemplateElement};

use super::TemplateError;

/// How deep blocks, `else` chains, subexpressions and partials may nest.
pub const MAX_DEPTH: usize = 100;
/// The widest `indent`.
pub const MAX_INDENT: u64 = 1024;
/// How many partials one template may expand, counting each `{{> name}}`
/// once with everything it includes.
pub const MAX_PARTIAL_EXPANSIONS: usize = 10_000;
/// The default of `render.max_output`.
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

/// The limits a configuration can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most one template may render to, and the most any value a helper
    /// computes may hold, in bytes (`render.max_output`).
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }
}

impl Limits {
    /// The message for a result or an output past `max_output`.
    pub fn output_message(&self, what: &str) -> String {
        format!(
            "{what} would be more than {} (the limit; set render.max_output to change it)",
            format_size(self.max_output as u64)
        )
    }
}

/// A size for people: `64 MiB`, `1 KiB`, `1000 bytes`.
pub fn format_size(bytes: u64) -> String {
    for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// Where rendered text goes: kept (the real render) or only counted
/// (discovery), and refused past the limit.
pub struct Sink {
    pub text: Vec<u8>,
    keep: bool,
    written: usize,
    limit: usize,
    pub over: bool,
}

impl Sink {
    pub fn new(keep: bool, limit: usize) -> Self {
        Sink {
            text: Vec::new(),
            keep,
            written: 0,
            limit,
            over: false,
        }
    }
}

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written.saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(io::Error::other("the output limit is reached"));
        }
        self.written += buf.len();
        if self.keep {
            self.text.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn error(template: &str, at: Option<(usize, usize)>, message: String) -> TemplateError {
    TemplateError {
        template: template.to_string(),
        line: at.map(|a| a.0),
        column: at.map(|a| a.1),
        message,
    }
}

pub fn depth_message() -> String {
    format!(
        "blocks and subexpressions are nested more than {MAX_DEPTH} deep here; the limit is {MAX_DEPTH}"
    )
}

/// The parts of an element that nest: its parameters and inner templates.
fn parts(e: &TemplateElement) -> (Vec<&Parameter>, Vec<&Template>, bool) {
    match e {
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => (
            std::iter::once(&h.name)
                .chain(&h.params)
                .chain(h.hash.values())
                .collect(),
            [&h.template, &h.inverse].into_iter().flatten().collect(),
            matches!(e, TemplateElement::HelperBlock(_)),
        ),
        TemplateElement::DecoratorExpression(d)
        | TemplateElement::DecoratorBlock(d)
        | TemplateElement::PartialExpression(d)
        | TemplateElement::PartialBlock(d) => (
            std::iter::once(&d.name)
                .chain(&d.params)
                .chain(d.hash.values())
                .collect(),
            d.template.iter().collect(),
            matches!(
                e,
                TemplateElement::DecoratorBlock(_) | TemplateElement::PartialBlock(_)
            ),
        ),
        _ => (Vec::new(), Vec::new(), false),
    }
}

/// How deep subexpressions nest in a parameter, without recursing.
fn parameter_depth(p: &Parameter) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(p, 0usize)];
    while let Some((p, depth)) = stack.pop() {
        if let Parameter::Subexpression(sub) = p {
            deepest = deepest.max(depth + 1);
            let inner = sub
                .params()
                .into_iter()
                .flatten()
                .chain(sub.hash().into_iter().flat_map(|h| h.values()));
            stack.extend(inner.map(|q| (q, depth + 1)));
        }
    }
    deepest
}

/// The first element of a parsed template nested deeper than the limit.
/// The text was scanned before parsing; this holds whatever the scan missed.
pub fn too_deep(name: &str, t: &Template) -> Option<TemplateError> {
    nesting(t, MAX_DEPTH)
        .1
        .map(|at| error(name, Some(at), depth_message()))
}

/// How deep a parsed template nests (blocks, chains, subexpressions),
/// without recursing, and where it first goes past `limit`.
pub fn nesting(t: &Template, limit: usize) -> (usize, Option<(usize, usize)>) {
    let mut deepest = 0;
    let mut stack = vec![(t, 0usize)];
    while let Some((t, depth)) = stack.pop() {
        for (i, e) in t.elements.iter().enumerate() {
            let (params, inner, block) = parts(e);
            let sub = params.into_iter().map(parameter_depth).max().unwrap_or(0);
            let here = depth + usize::from(block) + sub;
            deepest = deepest.max(here);
            if here > limit {
                let at = t.mapping.get(i).map_or((1, 1), |m| (m.0, m.1));
                return (deepest, Some(at));
            }
            stack.extend(inner.into_iter().map(|t| (t, depth + 1)));
        }
    }
    (deepest, None)
}

/// One `{{> name}}`: what it includes, how deep it is, and where.
struct Site {
    target: String,
    depth: usize,
    template: String,
    at: Option<(usize, usize)>,
}

/// Checks how the templates and their inline partials include each other:
/// no partial may include itself, directly or through others; partials may
/// not nest deeper than the limit with the blocks around them, nor expand
/// more than [`MAX_PARTIAL_EXPANSIONS`] times; and a partial's name must be
/// written in the template. Partial blocks (`{{#> name}}…{{/name}}`) are
/// refused: Handlebars renders their content to memory, outside the output
/// limit, so nesting them would multiply it unbounded.
pub fn check_partials(templates: &[(&str, &Template)]) -> Vec<TemplateError> {
    let mut errors = Vec::new();
    // Every body that can be included, by name: the templates themselves
    // and their inline partials (kept together when two share a name).
    let mut sites: HashMap<String, Vec<Site>> = HashMap::new();
    let mut own_depth: HashMap<String, usize> = HashMap::new();
    for (name, t) in templates {
        sites.entry(name.to_string()).or_default();
        let mut stack = vec![(*t, 0usize, name.to_string())];
        while let Some((t, depth, body)) = stack.pop() {
            let deepest = own_depth.entry(body.clone()).or_default();
            *deepest = (*deepest).max(depth);
            for (i, e) in t.elements.iter().enumerate() {
                let at = t.mapping.get(i).map(|m| (m.0, m.1));
                match e {
                    TemplateElement::PartialExpression(d) => {
                        let target = match &d.name {
                            Parameter::Name(n) => n.clone(),
                            Parameter::Literal(serde_json::Value::String(s)) => s.clone(),
                            _ => {
                                errors.push(error(
                                    name,
                                    at,
                                    "a partial's name must be written in the template, not computed".into(),
                                ));
                                continue;
                            }
                        };
                        if target == "@partial-block" {
                            errors.push(error(name, at, partial_block_message()));
                            continue;
                        }
                        sites.entry(body.clone()).or_default().push(Site {
                            target,
                            depth,
                            template: name.to_string(),
                            at,
                        });
                    }
                    TemplateElement::PartialBlock(_) => {
                        errors.push(error(name, at, partial_block_message()));
                    }
                    TemplateElement::DecoratorBlock(d) if matches!(&d.name, Parameter::Name(n) if n == "inline") => {
                        if let (
                            Some(Parameter::Literal(serde_json::Value::String(p))),
                            Some(inner),
                        ) = (d.params.first(), &d.template)
                        {
                            sites.entry(p.clone()).or_default();
                            stack.push((inner, 0, p.clone()));
                        }
                    }
                    _ => {
                        let (_, inner, _) = parts(e);
                        stack.extend(inner.into_iter().map(|t| (t, depth + 1, body.clone())));
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return errors;
    }
    // Depth-first over the inclusions, without recursing: a cycle is an
    // error; otherwise each body gets the depth and the number of
    // expansions it brings, from those of the bodies it includes.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done { depth: usize, expansions: usize },
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    let mut names: Vec<&str> = sites.keys().map(String::as_str).collect();
    names.sort_unstable();
    for root in names {
        if marks.contains_key(root) {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(root, 0)];
        marks.insert(root, Mark::Open);
        while let Some(top) = stack.last_mut() {
            let (node, next) = *top;
            top.1 += 1;
            let here = &sites[node];
            if let Some(site) = here.get(next) {
                let Some((target, _)) = sites.get_key_value(&site.target) else {
                    continue; // not defined here: Handlebars reports it
                };
                let target = target.as_str();
                match marks.get(target) {
                    Some(Mark::Open) => {
                        let from = stack.iter().position(|(n, _)| *n == target).unwrap_or(0);
                        let mut path: Vec<&str> = stack[from..].iter().map(|(n, _)| *n).collect();
                        path.push(target);
                        let through: Vec<String> = path[1..path.len() - 1]
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect();
                        let message = if through.is_empty() {
                            format!("partial \"{target}\" includes itself")
                        } else {
                            format!(
                                "partial \"{target}\" includes itself through {} ({})",
                                through.join(", "),
                                path.join(" → ")
                            )
                        };
                        return vec![error(&site.template, site.at, message)];
                    }
                    Some(Mark::Done { .. }) => {}
                    None => {
                        marks.insert(target, Mark::Open);
                        stack.push((target, 0));
                    }
                }
                continue;
            }
            let mut depth = own_depth.get(node).copied().unwrap_or(0);
            let mut expansions = 1usize;
            let mut worst: Option<&Site> = None;
            for site in here {
                if let Some(Mark::Done {
                    depth: d,
                    expansions: x,
                }) = marks.get(site.target.as_str())
                {
                    if site.depth + 1 + d > depth {
                        depth = site.depth + 1 + d;
                        worst = Some(site);
                    }
                    expansions = expansions.saturating_add(*x);
                }
            }
            let is_template = templates.iter().any(|(n, _)| *n == node);
            if is_template && let Some(site) = worst.filter(|_| depth > MAX_DEPTH) {
                errors.push(error(
                    &site.template,
                    site.at,
                    format!(
                        "blocks and partials nest more than {MAX_DEPTH} deep through partial \"{}\"; the limit is {MAX_DEPTH}",
                        site.target
                    ),
                ));
            } else if is_template && expansions > MAX_PARTIAL_EXPANSIONS {
                errors.push(error(
                    node,
                    None,
                    format!(
                        "its partials expand more than {MAX_PARTIAL_EXPANSIONS} times; the limit is {MAX_PARTIAL_EXPANSIONS}"
                    ),
                ));
            }
            marks.insert(node, Mark::Done { depth, expansions });
            stack.pop();
        }
    }
    errors
}

fn partial_block_message() -> String {
    "partial blocks ({{#> name}}…{{/name}}, {{> @partial-block}}) are not supported: include a partial with {{> name}}".into()
}
