//! Templates: Handlebars, strict, no HTML escaping, compiled once.
//!
//! Handlebars helpers are synchronous and must not do I/O, so rendering is in
//! two steps. In the discovery pass the reference helpers (`secret`, `ssm`,
//! `vault`, …) record each reference they are asked for and stand in a
//! placeholder (null, or an empty map for a prefix); the resolver then
//! fetches everything recorded at once. References computed from fetched
//! data (`{{#each (secret "consul:app/")}}{{secret (concat "vault:db/" @key)}}`,
//! or directly `{{consul (consul "c/1")}}`: a helper given a placeholder
//! gives one back) show up when discovery runs again with the first values
//! known, so discovery repeats until it finds nothing new, a bounded number
//! of times. The real render reads only resolved values; a template is never
//! produced from a placeholder.
//!
//! Before Handlebars sees a template, the `scan` module counts its nesting on
//! the text and finds where it can be compiled in pieces; `limits` holds the
//! other limits (partials, helper results, output).

mod limits;
mod scan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason, ScopedJson,
};
use serde_json::Value;

pub use limits::{
    DEFAULT_MAX_OUTPUT, Limits, MAX_DEPTH, MAX_INDENT, MAX_PARTIAL_EXPANSIONS, format_size,
};

use crate::reference::{self, Reference, Scheme};
use crate::secret::Secret;

/// A template error: which template, where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    /// The template's name: its source path as configured.
    pub template: String,
    /// Where in it, from 1, when known.
    pub line: Option<usize>,
    /// The column on that line, from 1, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.template, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.template, self.message),
            _ => write!(f, "{}: {}", self.template, self.message),
        }
    }
}

impl TemplateError {
    fn from_render(template: &str, e: &RenderError, bad_reference: Option<&str>) -> Self {
        let message = match (bad_reference, e.reason()) {
            (Some(detail), _) => detail.to_string(),
            (None, RenderErrorReason::MissingVariable(Some(var))) => format!(
                "\"{var}\" is not defined (templates see no variables of their own: read values with {{{{secret \"REF\"}}}})"
            ),
            (None, reason) => reason.to_string(),
        };
        TemplateError {
            template: e
                .template_name
                .clone()
                .unwrap_or_else(|| template.to_string()),
            line: e.line_no,
            column: e.column_no,
            message,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Discover,
    Render,
}

struct State {
    mode: Mode,
    values: Arc<HashMap<Reference, Secret>>,
    /// References asked for during discovery whose value is not known yet.
    unknown: BTreeSet<Reference>,
    /// A reference that did not parse, with its error, during the current render.
    bad_reference: Option<String>,
    /// A limit a helper's arguments or result went past, during the current render.
    past_limit: Option<String>,
    limits: Limits,
}

impl State {
    fn reset(&mut self, mode: Mode, values: &Arc<HashMap<Reference, Secret>>) {
        self.mode = mode;
        self.values = values.clone();
        self.unknown.clear();
        self.bad_reference = None;
        self.past_limit = None;
    }

    /// In discovery, whether a value may be a placeholder standing in for
    /// one not fetched yet (or be computed from one): some reference of this
    /// render is still unknown and the value is empty in the way placeholders
    /// are. Literals written in the template are never placeholders.
    fn may_be_placeholder(&self, p: &handlebars::PathAndJson<'_>) -> bool {
        self.mode == Mode::Discover
            && !self.unknown.is_empty()
            && p.try_get_constant_value().is_none()
            && is_placeholder(p.value())
    }
}

/// What discovery stands in for a value not fetched yet: `null` for a value
/// (falsy, and distinct from the empty text a real value may be), an empty
/// map for a prefix and an empty list for a service, so `#if` and `#each`
/// skip their blocks.
fn is_placeholder(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The outcome of one discovery pass over every template.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Every reference the templates asked for whose value is not known yet,
    /// with the templates that asked.
    pub unknown: BTreeMap<Reference, BTreeSet<String>>,
    /// References that did not parse and limits passed: input errors.
    pub bad_references: Vec<TemplateError>,
    /// Render errors in templates that asked for nothing unknown: with all
    /// their data present, they are errors in the template itself.
    pub errors: Vec<TemplateError>,
}

/// Every template of a run, compiled into one registry with envrender's
/// helpers, rendered in discovery passes and then for real.
pub struct Templates {
    registry: Handlebars<'static>,
    state: Arc<Mutex<State>>,
    names: Vec<String>,
}

impl Templates {
    /// Compiles every template with the default limits.
    pub fn compile(sources: &[(String, String)]) -> Result<Templates, Vec<TemplateError>> {
        Templates::compile_with(sources, Limits::default())
    }

    /// Compiles every template; returns every compile error, not just the
    /// first. Nesting and partials are checked here, before any fetch.
    pub fn compile_with(
        sources: &[(String, String)],
        limits: Limits,
    ) -> Result<Templates, Vec<TemplateError>> {
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Discover,
            values: Arc::new(HashMap::new()),
            unknown: BTreeSet::new(),
            bad_reference: None,
            past_limit: None,
            limits,
        }));
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        registry.register_escape_fn(handlebars::no_escape);
        register_helpers(&mut registry, &state);
        let mut errors = Vec::new();
        let mut names = Vec::new();
        for (name, text) in sources {
            // Counted on the text first: Handlebars' parser recurses once
            // per level and would overflow the stack on deep nesting.
            let scanned = scan::scan(text, MAX_DEPTH, PIECE);
            if let Some((line, column)) = scanned.too_deep {
                errors.push(TemplateError {
                    template: name.clone(),
                    line: Some(line),
                    column: Some(column),
                    message: limits::depth_message(),
                });
                continue;
            }
            let compiled = match scan::compile_pieces(name, text, &scanned.cuts) {
                Some(template) => Ok(template),
                None => handlebars::template::Template::compile_with_name(text, name.clone()),
            };
            match compiled {
                Ok(template) => {
                    if let Some(e) = limits::too_deep(name, &template) {
                        errors.push(e);
                        continue;
                    }
                    registry.register_template(name, template);
                    names.push(name.clone());
                }
                Err(e) => {
                    let (line, column) = e.pos().unzip();
                    errors.push(TemplateError {
                        template: name.clone(),
                        line,
                        column,
                        message: format!("cannot parse template: {}", e.reason()),
                    });
                }
            }
        }
        let parsed: Vec<(&str, &handlebars::template::Template)> = names
            .iter()
            .filter_map(|n| Some((n.as_str(), registry.get_template(n)?)))
            .collect();
        errors.extend(limits::check_partials(&parsed));
        for name in &names {
            if let Some(template) = registry.get_template(name) {
                undefined_variables(name, template, &mut errors);
            }
        }
        if errors.is_empty() {
            Ok(Templates {
                registry,
                state,
                names,
            })
        } else {
            Err(errors)
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in a helper cannot leave the state half-written in a way
        // that matters: every render resets it first.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renders every template in discovery mode with `known` values.
    pub fn discover(&self, known: &Arc<HashMap<Reference, Secret>>) -> Discovery {
        let mut out = Discovery::default();
        for name in &self.names {
            let limit = {
                let mut st = self.state();
                st.reset(Mode::Discover, known);
                st.limits.max_output
            };
            // Discovery's output is only counted, against the same limit.
            let mut sink = limits::Sink::new(false, limit);
            let result =
                self.registry
                    .render_with_context_to_write(name, &empty_context(), &mut sink);
            let mut st = self.state();
            let asked_unknown = !st.unknown.is_empty();
            for r in std::mem::take(&mut st.unknown) {
                out.unknown.entry(r).or_default().insert(name.clone());
            }
            if let Err(e) = result {
                // A limit is passed by what is known, never by a
                // placeholder: report it now.
                let past_limit = st
                    .past_limit
                    .take()
                    .or_else(|| sink.over.then(|| st.limits.output_message("the output")));
                if let Some(message) = past_limit {
                    out.bad_references
                        .push(TemplateError::from_render(name, &e, Some(&message)));
                } else if let Some(bad) = st.bad_reference.take() {
                    out.bad_references
                        .push(TemplateError::from_render(name, &e, Some(&bad)));
                } else if !asked_unknown {
                    out.errors.push(TemplateError::from_render(name, &e, None));
                }
                // Otherwise the error may come from a placeholder; decide once
                // the unknown values are fetched.
            }
        }
        out
    }

    /// The real render of one template from resolved values.
    pub fn render(
        &self,
        name: &str,
        values: &Arc<HashMap<Reference, Secret>>,
    ) -> Result<String, TemplateError> {
        let limit = {
            let mut st = self.state();
            st.reset(Mode::Render, values);
            st.limits.max_output
        };
        let mut sink = limits::Sink::new(true, limit);
        let result = self
            .registry
            .render_with_context_to_write(name, &empty_context(), &mut sink);
        let mut st = self.state();
        let detail = st
            .past_limit
            .take()
            .or_else(|| sink.over.then(|| st.limits.output_message("the output")))
            .or_else(|| st.bad_reference.take());
        drop(st);
        result.map_err(|e| TemplateError::from_render(name, &e, detail.as_deref()))?;
        String::from_utf8(sink.text).map_err(|_| TemplateError {
            template: name.to_string(),
            line: None,
            column: None,
            message: "the output is not UTF-8 text".into(),
        })
    }
}

/// The size of the pieces a large template is compiled in (see [`scan`]).
const PIECE: usize = 1024;

/// Helpers known to the registry: Handlebars' built-ins and ours.
const HELPERS: &[&str] = &[
    "service",
    "if",
    "unless",
    "each",
    "with",
    "lookup",
    "raw",
    "log",
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "and",
    "or",
    "not",
    "len",
    "secret",
    "consul",
    "vault",
    "ssm",
    "sm",
    "kms",
    "file",
    "env",
    "default",
    "json",
    "base64",
    "base64_decode",
    "indent",
    "upper",
    "lower",
    "trim",
    "concat",
    "join",
    "split",
];

/// Finds variables read in the root context. Templates get no data of their
/// own (values come from helpers), so such a read always fails; finding it
/// at compile time makes it an input error reported before any fetch, even
/// when the template also asks for values.
fn undefined_variables(
    name: &str,
    template: &handlebars::template::Template,
    errors: &mut Vec<TemplateError>,
) {
    use handlebars::template::{Parameter, TemplateElement};

    fn variable(p: &Parameter) -> Option<&str> {
        match p {
            Parameter::Path(handlebars::Path::Relative((_, raw)))
                if raw != "this" && !raw.starts_with("this.") && !raw.starts_with("this/") =>
            {
                Some(raw)
            }
            _ => None,
        }
    }

    fn check_params(params: &[&Parameter], found: &mut Vec<String>) {
        for p in params {
            if let Some(v) = variable(p) {
                found.push(v.to_string());
            } else if let Parameter::Subexpression(sub) = p {
                let inner: Vec<&Parameter> = sub
                    .params()
                    .into_iter()
                    .flatten()
                    .chain(sub.hash().into_iter().flat_map(|h| h.values()))
                    .collect();
                check_params(&inner, found);
            }
        }
    }

    fn walk(name: &str, t: &handlebars::template::Template, errors: &mut Vec<TemplateError>) {
        for (i, element) in t.elements.iter().enumerate() {
            let (line, column) = t.mapping.get(i).map(|m| (m.0, m.1)).unzip();
            let mut found = Vec::new();
            match element {
                TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                    let called = match &h.name {
                        Parameter::Name(n) => Some(n.as_str()),
                        p => variable(p),
                    };
                    let is_helper = called.is_some_and(|n| HELPERS.contains(&n));
                    if !is_helper
                        && h.params.is_empty()
                        && h.hash.is_empty()
                        && let Some(v) = called.filter(|_| variable(&h.name).is_some())
                    {
                        found.push(v.to_string());
                    }
                    let params: Vec<&Parameter> = h.params.iter().chain(h.hash.values()).collect();
                    check_params(&params, &mut found);
                }
                TemplateElement::HelperBlock(h) => {
                    let params: Vec<&Parameter> = h.params.iter().chain(h.hash.values()).collect();
                    check_params(&params, &mut found);
                    // `if` and `unless` keep the root context; `each`,
                    // `with` and others give their block a context of data.
                    let keeps_context =
                        matches!(&h.name, Parameter::Name(n) if n == "if" || n == "unless");
                    if keeps_context {
                        for inner in [&h.template, &h.inverse].into_iter().flatten() {
                            walk(name, inner, errors);
                        }
                    }
                }
                _ => {}
            }
            for v in found {
                errors.push(TemplateError {
                    template: name.to_string(),
                    line,
                    column,
                    message: format!(
                        "\"{v}\" is not defined (templates see no variables of their own: read values with {{{{secret \"REF\"}}}})"
                    ),
                });
            }
        }
    }

    walk(name, template, errors);
}

fn empty_context() -> Context {
    Context::wraps(serde_json::json!({})).expect("an empty object is valid context data")
}

fn other(message: impl Into<String>) -> RenderError {
    RenderErrorReason::Other(message.into()).into()
}

/// `secret "REF"` and the per-scheme short forms (`ssm "/x"`, `vault "p" "field"`).
struct ReferenceHelper {
    state: Arc<Mutex<State>>,
    name: &'static str,
    scheme: Option<Scheme>,
}

impl ReferenceHelper {
    fn reference(&self, h: &Helper<'_>) -> Result<Reference, String> {
        let usage = match self.scheme {
            None => "{{secret \"scheme:path\"}}".to_string(),
            Some(s) => format!("{{{{{} \"PATH\" [\"FIELD\"]}}}}", s.prefix()),
        };
        let Some(Value::String(arg)) = h.param(0).map(|p| p.value()) else {
            return Err(format!(
                "{}: expects a reference string, as in {usage}",
                self.name
            ));
        };
        let most = if self.scheme.is_some() { 2 } else { 1 };
        if h.params().len() > most {
            return Err(format!(
                "{}: takes at most {most} argument{}, got {}; as in {usage}",
                self.name,
                if most == 1 { "" } else { "s" },
                h.params().len()
            ));
        }
        let mut text = match self.scheme {
            None => arg.clone(),
            Some(s) => format!("{}:{arg}", s.prefix()),
        };
        match h.param(1).map(|p| p.value()) {
            None => {}
            Some(Value::String(field)) if !field.is_empty() => {
                text = format!("{text}#{field}");
            }
            Some(_) => {
                return Err(format!(
                    "{}: the second argument is a field name string",
                    self.name
                ));
            }
        }
        let mut r = reference::parse(&text).map_err(|e| e.to_string())?;
        for (key, value) in h.hash() {
            // A default is part of the reference, which messages and `check`
            // print: it must be text written in the template, never a value
            // computed from fetched data.
            if *key == "default" && value.try_get_constant_value().is_none() {
                return Err(format!(
                    "{}: default= takes literal text; to fall back to another value write {{{{default (secret \"REF|optional\") (secret \"OTHER\")}}}}",
                    self.name
                ));
            }
            match (*key, value.value()) {
                ("default", Value::String(d)) => r.default = Some(d.clone()),
                ("default", v) if !v.is_object() && !v.is_array() && !v.is_null() => {
                    r.default = Some(crate::secret::to_text(v))
                }
                ("optional", Value::Bool(b)) => r.optional = *b,
                (k, _) => {
                    return Err(format!(
                        "{}: unknown option {k}= (options are default=\"TEXT\" and optional=true)",
                        self.name
                    ));
                }
            }
        }
        Ok(r)
    }

    fn lookup(&self, h: &Helper<'_>) -> Result<Value, RenderError> {
        {
            // A reference computed from a value not fetched yet waits for a
            // later round of discovery, as it would inside an #each.
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if h.params().iter().any(|p| st.may_be_placeholder(p)) {
                return Ok(Value::Null);
            }
        }
        let r = match self.reference(h) {
            Ok(r) => r,
            Err(message) => {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.bad_reference = Some(message.clone());
                return Err(other(message));
            }
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = st.values.get(&r) {
            tracing::trace!(reference = %r, "template read a resolved value");
            return Ok(v.expose().clone());
        }
        match st.mode {
            Mode::Discover => {
                tracing::trace!(reference = %r, "template asked for a reference");
                let placeholder = if r.source.scheme == Scheme::Service && r.field.is_none() {
                    Value::Array(Vec::new())
                } else if r.source.is_prefix() && r.field.is_none() {
                    Value::Object(Default::default())
                } else {
                    Value::Null
                };
                st.unknown.insert(r);
                Ok(placeholder)
            }
            Mode::Render => Err(other(format!("{r} was not resolved"))),
        }
    }
}

impl HelperDef for ReferenceHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        self.lookup(h).map(ScopedJson::Derived)
    }

    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let value = self.lookup(h)?;
        match &value {
            Value::Object(_) | Value::Array(_) => Err(other(format!(
                "{}: the value is a {}; iterate it with {{{{#each}}}}, select a field with #key, or print it with the json helper",
                self.name,
                crate::secret::describe(&value)
            ))),
            v => Ok(out.write(&crate::secret::to_text(v))?),
        }
    }
}

/// A helper that computes a value from its arguments, within the limits.
/// Its error messages never quote the arguments, which may be secrets.
type TransformFn = fn(&Helper<'_>, &Limits) -> Result<Value, Failed>;

/// Why a helper failed: used wrongly, or past a limit (an input error even
/// where a placeholder is about).
enum Failed {
    Usage(String),
    Limit(String),
}

impl From<String> for Failed {
    fn from(m: String) -> Self {
        Failed::Usage(m)
    }
}

impl From<&str> for Failed {
    fn from(m: &str) -> Self {
        Failed::Usage(m.to_string())
    }
}

/// Refuses a result of `len` bytes past the output limit.
fn fits(len: usize, limits: &Limits) -> Result<(), Failed> {
    if len > limits.max_output {
        Err(Failed::Limit(limits.output_message("the result")))
    } else {
        Ok(())
    }
}

/// Refuses a text result past the output limit.
fn text_within(s: String, limits: &Limits) -> Result<Value, Failed> {
    fits(s.len(), limits)?;
    Ok(Value::String(s))
}

struct Transform {
    name: &'static str,
    f: TransformFn,
    state: Arc<Mutex<State>>,
}

impl HelperDef for Transform {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let (limits, from_placeholder) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let from_placeholder = h.params().iter().any(|p| st.may_be_placeholder(p));
            (st.limits, from_placeholder)
        };
        match (self.f)(h, &limits) {
            // Computed from a placeholder, the result is one too: what it
            // would be is known only once the value is fetched. A limit
            // passed is not the placeholder's doing (placeholders are
            // empty): that is reported at once, below.
            Ok(_) | Err(Failed::Usage(_)) if from_placeholder => {
                Ok(ScopedJson::Derived(Value::Null))
            }
            Ok(v) => Ok(ScopedJson::Derived(v)),
            Err(Failed::Limit(m)) => {
                let message = format!("{}: {m}", self.name);
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.past_limit = Some(message.clone());
                Err(other(message))
            }
            Err(Failed::Usage(m)) => {
                // In discovery an argument may be a placeholder standing in
                // for a value not fetched yet: carry on, so the references
                // after it are found in this pass. The real render reports
                // the error if it is still there.
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.mode == Mode::Discover && !st.unknown.is_empty() {
                    return Ok(ScopedJson::Derived(Value::Null));
                }
                Err(other(format!("{}: {m}", self.name)))
            }
        }
    }
}

fn arg<'a>(h: &'a Helper<'_>, i: usize) -> Result<&'a Value, String> {
    h.param(i)
        .map(|p| p.value())
        .ok_or_else(|| format!("argument {} is missing", i + 1))
}

fn text_arg(h: &Helper<'_>, i: usize) -> Result<String, String> {
    match arg(h, i)? {
        Value::Object(_) | Value::Array(_) => {
            Err(format!("argument {} is a map or list, not text", i + 1))
        }
        v => Ok(crate::secret::to_text(v)),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn register_helpers(registry: &mut Handlebars<'static>, state: &Arc<Mutex<State>>) {
    let reference_helpers: [(&'static str, Option<Scheme>); 9] = [
        ("secret", None),
        ("consul", Some(Scheme::Consul)),
        ("vault", Some(Scheme::Vault)),
        ("ssm", Some(Scheme::Ssm)),
        ("sm", Some(Scheme::SecretsManager)),
        ("kms", Some(Scheme::Kms)),
        ("file", Some(Scheme::File)),
        ("env", Some(Scheme::Env)),
        ("service", Some(Scheme::Service)),
    ];
    for (name, scheme) in reference_helpers {
        registry.register_helper(
            name,
            Box::new(ReferenceHelper {
                state: state.clone(),
                name,
                scheme,
            }),
        );
    }
    let transforms: [(&'static str, TransformFn); 11] = [
        ("default", |h, _| {
            let v = arg(h, 0)?;
            Ok(if is_empty(v) {
                arg(h, 1)?.clone()
            } else {
                v.clone()
            })
        }),
        ("json", |h, limits| {
            let v = arg(h, 0)?;
            let pretty = matches!(
                h.hash_get("pretty").map(|p| p.value()),
                Some(Value::Bool(true))
            );
            // Written through the limit: pretty printing can multiply a
            // deeply nested value's size.
            let mut sink = limits::Sink::new(true, limits.max_output);
            let written = if pretty {
                serde_json::to_writer_pretty(&mut sink, v)
            } else {
                serde_json::to_writer(&mut sink, v)
            };
            if sink.over {
                return Err(Failed::Limit(limits.output_message("the result")));
            }
            written.map_err(|_| "cannot encode as JSON")?;
            String::from_utf8(sink.text)
                .map(Value::String)
                .map_err(|_| "cannot encode as JSON".into())
        }),
        ("base64", |h, limits| {
            let text = text_arg(h, 0)?;
            fits(text.len().div_ceil(3).saturating_mul(4), limits)?;
            Ok(Value::String(
                base64::engine::general_purpose::STANDARD.encode(text),
            ))
        }),
        ("base64_decode", |h, _| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text_arg(h, 0)?.trim())
                .map_err(|_| "the value is not valid base64".to_string())?;
            String::from_utf8(bytes)
                .map(Value::String)
                .map_err(|_| "the decoded value is not UTF-8 text".into())
        }),
        ("indent", |h, limits| {
            let n = arg(h, 0)?
                .as_u64()
                .ok_or("the first argument is the number of spaces")?;
            if n > MAX_INDENT {
                return Err(Failed::Limit(format!(
                    "{n} spaces is too wide; the limit is {MAX_INDENT}"
                )));
            }
            let text = text_arg(h, 1)?;
            let lines = text.split('\n').filter(|l| !l.is_empty()).count();
            fits(
                (n as usize)
                    .saturating_mul(lines)
                    .saturating_add(text.len()),
                limits,
            )?;
            let pad = " ".repeat(n as usize);
            let indented: Vec<String> = text
                .split('\n')
                .map(|l| {
                    if l.is_empty() {
                        String::new()
                    } else {
                        format!("{pad}{l}")
                    }
                })
                .collect();
            Ok(Value::String(indented.join("\n")))
        }),
        ("upper", |h, limits| {
            text_within(text_arg(h, 0)?.to_uppercase(), limits)
        }),
        ("lower", |h, limits| {
            text_within(text_arg(h, 0)?.to_lowercase(), limits)
        }),
        ("trim", |h, _| {
            Ok(Value::String(text_arg(h, 0)?.trim().to_string()))
        }),
        ("concat", |h, limits| {
            let parts = (0..h.params().len())
                .map(|i| text_arg(h, i))
                .collect::<Result<Vec<String>, String>>()?;
            fits(parts.iter().map(String::len).sum(), limits)?;
            Ok(Value::String(parts.concat()))
        }),
        ("join", |h, limits| {
            let sep = text_arg(h, 1)?;
            let parts: Vec<String> = match arg(h, 0)? {
                Value::Array(items) => items.iter().map(crate::secret::to_text).collect(),
                Value::Object(map) => map.keys().cloned().collect(),
                _ => {
                    return Err(
                        "the first argument is a list (or a map, whose keys are joined)".into(),
                    );
                }
            };
            let seps = sep.len().saturating_mul(parts.len().saturating_sub(1));
            fits(
                parts
                    .iter()
                    .map(String::len)
                    .sum::<usize>()
                    .saturating_add(seps),
                limits,
            )?;
            Ok(Value::String(parts.join(&sep)))
        }),
        ("split", |h, limits| {
            let sep = text_arg(h, 1)?;
            let text = text_arg(h, 0)?;
            // Each item costs a value besides its text.
            let items = if sep.is_empty() {
                text.chars().count() + 2
            } else {
                text.matches(sep.as_str()).count() + 1
            };
            fits(
                items
                    .saturating_mul(std::mem::size_of::<Value>() + 24)
                    .saturating_add(text.len()),
                limits,
            )?;
            Ok(Value::Array(
                text.split(sep.as_str())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            ))
        }),
    ];
    for (name, f) in transforms {
        registry.register_helper(
            name,
            Box::new(Transform {
                name,
                f,
                state: state.clone(),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::reference::parse;

    fn compile(text: &str) -> Templates {
        Templates::compile(&[("t.hbs".to_string(), text.to_string())]).unwrap()
    }

    fn values(pairs: &[(&str, Value)]) -> Arc<HashMap<Reference, Secret>> {
        Arc::new(
            pairs
                .iter()
                .map(|(r, v)| (parse(r).unwrap(), Secret::new(v.clone())))
                .collect(),
        )
    }

    fn refs(d: &Discovery) -> Vec<String> {
        d.unknown.keys().map(|r| r.to_string()).collect()
    }

    #[test]
    fn discovery_records_every_reference() {
        let t = compile(
            "host={{consul \"app/db/host\"}}\npass={{secret \"ssm:/app/db/password\"}}\n\
             user={{vault \"secret/app\" \"user\"}}\nk={{ssm \"/x\" default=\"1\"}}\n",
        );
        let d = t.discover(&values(&[]));
        assert_eq!(
            refs(&d),
            [
                "consul:app/db/host",
                "vault:secret/app#user",
                "ssm:/app/db/password",
                "ssm:/x|default=1"
            ]
        );
        assert!(d.errors.is_empty() && d.bad_references.is_empty());
    }

    #[test]
    fn discovery_repeats_for_references_computed_from_data() {
        let t = compile(
            "{{#each (secret \"consul:svc/\")}}{{@key}}={{secret (concat \"vault:db/\" this \"#password\")}}\n{{/each}}",
        );
        let d1 = t.discover(&values(&[]));
        assert_eq!(refs(&d1), ["consul:svc/"]);
        let known = values(&[("consul:svc/", json!({"a": "alpha", "b": "beta"}))]);
        let d2 = t.discover(&known);
        assert_eq!(
            refs(&d2),
            ["vault:db/alpha#password", "vault:db/beta#password"]
        );
        let all = values(&[
            ("consul:svc/", json!({"a": "alpha", "b": "beta"})),
            ("vault:db/alpha#password", json!("p1")),
            ("vault:db/beta#password", json!("p2")),
        ]);
        assert!(t.discover(&all).unknown.is_empty());
        assert_eq!(t.render("t.hbs", &all).unwrap(), "a=p1\nb=p2\n");
    }

    #[test]
    fn renders_without_html_escaping() {
        let t = compile("url={{secret \"env:URL\"}}\n");
        let v = values(&[("env:URL", json!("https://a/?x=1&y=<2>"))]);
        assert_eq!(t.render("t.hbs", &v).unwrap(), "url=https://a/?x=1&y=<2>\n");
    }

    #[test]
    fn transforms() {
        let t = compile(concat!(
            "{{upper (secret \"env:A\")}} {{lower \"AB\"}} {{trim \"  x \"}}\n",
            "{{base64 (secret \"env:A\")}} {{base64_decode \"aGk=\"}}\n",
            "{{json (secret \"file:v.json\")}}\n",
            "{{indent 2 (secret \"file:cert.pem\")}}\n",
            "{{default (secret \"env:MISSING|optional\") \"fallback\"}}\n",
            "{{join (secret \"file:v.json#list\") \",\"}} {{join (secret \"file:v.json\") \"+\"}}\n",
            "{{#each (split \"a:b\" \":\")}}[{{this}}]{{/each}}\n",
        ));
        let v = values(&[
            ("env:A", json!("abc")),
            ("file:v.json", json!({"list": [1, "two"], "k": "v"})),
            ("file:v.json#list", json!([1, "two"])),
            ("file:cert.pem", json!("L1\nL2\n")),
            ("env:MISSING|optional", json!("")),
        ]);
        assert_eq!(
            t.render("t.hbs", &v).unwrap(),
            "ABC ab x\nYWJj hi\n{\"k\":\"v\",\"list\":[1,\"two\"]}\n  L1\n  L2\n\nfallback\n1,two k+list\n[a][b]\n"
        );
    }

    #[test]
    fn a_map_cannot_be_printed_directly() {
        let t = compile("{{secret \"consul:app/\"}}");
        let v = values(&[("consul:app/", json!({"a": "SECRETVALUE"}))]);
        let e = t.render("t.hbs", &v).unwrap_err();
        assert!(e.message.contains("map, 1 keys"), "{e}");
        assert!(!e.to_string().contains("SECRETVALUE"));
        assert_eq!((e.line, e.column), (Some(1), Some(1)));
    }

    #[test]
    fn errors_name_template_line_and_column() {
        let e = Templates::compile(&[("a.hbs".into(), "ok\n{{#if x}}\n".into())])
            .err()
            .unwrap();
        assert_eq!(e[0].template, "a.hbs");
        assert!(e[0].line.is_some());
        // A helper used wrongly fails in discovery, with its position.
        let t = compile("line1\n  {{indent \"x\" \"y\"}}\n");
        let d = t.discover(&values(&[]));
        assert_eq!(d.errors.len(), 1);
        let shown = d.errors[0].to_string();
        assert!(shown.starts_with("t.hbs:2:3: indent:"), "{shown}");
        assert!(shown.contains("number of spaces"), "{shown}");
    }

    #[test]
    fn root_variables_are_compile_errors() {
        let e = Templates::compile(&[(
            "t.hbs".into(),
            "{{secret \"env:A\"}}\n {{undefined}}\n{{#if (secret \"env:B\")}}{{upper other}}{{/if}}\n\
             {{#each (secret \"file:d/\")}}{{@key}}{{this}}{{inside}}{{/each}}{{concat \"a\" (lower nested)}}{{this}}"
                .into(),
        )])
        .err()
        .unwrap();
        let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(
            shown[0].starts_with("t.hbs:2:2: \"undefined\" is not defined"),
            "{shown:#?}"
        );
        assert!(shown[1].contains("\"other\""), "{shown:#?}");
        assert!(shown[2].contains("\"nested\""), "{shown:#?}");
    }

    #[test]
    fn bad_references_are_reported_with_their_position() {
        let t = compile("a\nb {{secret \"smm:/x\"}}\n");
        let d = t.discover(&values(&[]));
        assert_eq!(d.bad_references.len(), 1);
        let e = &d.bad_references[0];
        assert_eq!((e.line, e.column), (Some(2), Some(3)));
        assert!(e.message.contains("unknown scheme \"smm\""), "{e}");
        let t = compile("{{secret \"env:A\" default=(secret \"env:B\")}}");
        assert!(
            t.discover(&values(&[])).bad_references[0]
                .message
                .contains("default= takes literal text")
        );
        let t = compile("{{secret \"env:A\" colour=\"red\"}}");
        assert!(
            t.discover(&values(&[])).bad_references[0]
                .message
                .contains("unknown option colour=")
        );
    }

    #[test]
    fn transforms_on_placeholders_do_not_hide_later_references() {
        let mut text = String::new();
        for i in 0..8 {
            text.push_str(&format!(
                "{{{{join (secret \"file:v{i}.json#list\") \",\"}}}}\n"
            ));
        }
        let t = compile(&text);
        // One pass finds all eight, though join fails on each placeholder.
        let d = t.discover(&values(&[]));
        assert_eq!(d.unknown.len(), 8);
        assert!(d.errors.is_empty());
    }

    #[test]
    fn placeholder_errors_wait_for_data() {
        // In discovery the placeholder is "", which base64_decode accepts, but
        // an #each over a field placeholder must not be reported as an error.
        let t = compile("{{#each (secret \"file:v.yaml#servers\")}}{{this.host}}{{/each}}");
        let d = t.discover(&values(&[]));
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(refs(&d), ["file:v.yaml#servers"]);
        let v = values(&[("file:v.yaml#servers", json!([{"host": "a"}, {"host": "b"}]))]);
        assert_eq!(t.render("t.hbs", &v).unwrap(), "ab");
    }

    #[test]
    fn references_computed_directly_from_values_wait_for_them() {
        let t = compile(concat!(
            "{{consul (consul \"c/1\")}}\n",
            "{{secret (concat \"vault:db/\" (upper (consul \"c/2\")) \"#password\")}}\n",
            "{{vault (consul \"c/3\") \"field\"}}\n",
            "{{ssm (default (consul \"c/4|optional\") \"/fallback\")}}\n",
        ));
        // First round: only what is written in the template; nothing is
        // asked for on behalf of a placeholder, and nothing is an error.
        let d1 = t.discover(&values(&[]));
        assert!(d1.bad_references.is_empty(), "{:?}", d1.bad_references);
        assert!(d1.errors.is_empty(), "{:?}", d1.errors);
        assert_eq!(
            refs(&d1),
            [
                "consul:c/1",
                "consul:c/2",
                "consul:c/3",
                "consul:c/4|optional"
            ]
        );
        let known = values(&[
            ("consul:c/1", json!("k/1")),
            ("consul:c/2", json!("alpha")),
            ("consul:c/3", json!("secret/app")),
            ("consul:c/4|optional", json!("")),
        ]);
        let d2 = t.discover(&known);
        assert!(d2.bad_references.is_empty(), "{:?}", d2.bad_references);
        assert_eq!(
            refs(&d2),
            [
                "consul:k/1",
                "vault:db/ALPHA#password",
                "vault:secret/app#field",
                "ssm:/fallback"
            ]
        );
        // An empty text fetched is a value, not a placeholder: a reference
        // made from it alone is reported.
        let t = compile("{{consul (consul \"c/1\")}}");
        let d = t.discover(&values(&[("consul:c/1", json!(""))]));
        assert_eq!(d.bad_references.len(), 1);
        assert!(d.bad_references[0].message.contains("consul: empty path"));
    }

    #[test]
    fn helper_results_are_limited() {
        let limits = Limits { max_output: 100 };
        let t = Templates::compile_with(
            &[
                ("w.hbs".into(), "{{indent 2000 \"x\"}}".into()),
                ("i.hbs".into(), "{{indent 10 (secret \"env:A\")}}".into()),
                (
                    "c.hbs".into(),
                    "{{concat (secret \"env:B\") (secret \"env:B\")}}".into(),
                ),
                ("b.hbs".into(), "{{base64 (secret \"env:B\")}}".into()),
                (
                    "s.hbs".into(),
                    "{{#each (split (secret \"env:B\") \"\")}}{{/each}}".into(),
                ),
                (
                    "j.hbs".into(),
                    "{{json (secret \"env:L\") pretty=true}}".into(),
                ),
                (
                    "o.hbs".into(),
                    "{{secret \"env:B\"}}{{secret \"env:B\"}}".into(),
                ),
                ("ok.hbs".into(), "{{indent 2 (secret \"env:A\")}}".into()),
            ],
            limits,
        )
        .unwrap();
        let v = values(&[
            ("env:A", json!("a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n")),
            ("env:B", json!("b".repeat(90))),
            ("env:L", json!([[[(0..30).collect::<Vec<u32>>()]]])),
        ]);
        let d = t.discover(&v);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let shown: Vec<String> = d.bad_references.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 7, "{shown:#?}");
        assert!(
            shown[0].starts_with("w.hbs:1:1: indent: 2000 spaces is too wide; the limit is 1024"),
            "{shown:#?}"
        );
        for e in &shown[1..] {
            assert!(
                e.contains("would be more than 100 bytes (the limit; set render.max_output"),
                "{shown:#?}"
            );
            assert!(!e.contains("bbbb"), "{e}");
        }
        assert!(shown[6].starts_with("o.hbs:1:"), "{shown:#?}");
        // A width past the limit is found before the value is fetched.
        assert_eq!(t.render("ok.hbs", &v).unwrap().len(), 40);
        let wide = compile("{{indent 5000 (secret \"env:A\")}}");
        let d = wide.discover(&values(&[]));
        assert_eq!(d.bad_references.len(), 1, "{:?}", d.bad_references);
        assert!(d.bad_references[0].message.contains("the limit is 1024"));
    }

    #[test]
    fn compiling_in_pieces_gives_the_same_template() {
        // Every kind of element, whitespace control and standalone line,
        // cut wherever the scan allows (pieces of one byte).
        let cases = [
            "a\nb {{x}}\n{{y}}{{z}}\n",
            "{{#if t}}\n  in\n{{/if}}\nafter {{x}}\nx{{y}}\n",
            "  {{#each l}}\n{{this}}\n  {{/each}}\n{{x}}\nend",
            "{{x~}}\n\n  y\n{{~x}}\n{{x}} \n {{x}}",
            "{{!-- a\n{{x}}\nb --}}\nc\n{{! d }}\ne",
            "{{{{raw}}}}\n{{x}}\n{{{{/raw}}}}\nq\n",
            "\\{{x}}\nr\n\\\\{{x}}\ns {{{x}}}\n{{&x}}\nt",
            "{{#*inline \"p\"}}\n[{{x}}]\n{{/inline}}\n{{> p}}\n  {{> p}}\nu",
            "{{lookup x \"a b\"}}\nv\n{{#if t}}{{else if f}}\nw\n{{else}}\nz\n{{/if}}\n",
            "\r\n{{x}}\r\n  {{#if t}}\r\n{{x}}\r\n{{/if}}\r\n",
        ];
        let data = json!({"x": "X", "y": "Y", "z": "Z", "t": true, "f": false, "l": [1, 2]});
        for text in cases {
            let whole =
                handlebars::template::Template::compile_with_name(text, "t".into()).unwrap();
            let cuts = scan::scan(text, MAX_DEPTH, 1).cuts;
            assert!(!cuts.is_empty(), "{text:?}");
            let pieces = scan::compile_pieces("t", text, &cuts).unwrap();
            let render = |t: handlebars::template::Template| {
                let mut h = Handlebars::new();
                h.register_escape_fn(handlebars::no_escape);
                h.register_template("t", t);
                h.render("t", &data).unwrap()
            };
            let positions = |t: &handlebars::template::Template| -> Vec<(usize, usize)> {
                t.elements
                    .iter()
                    .zip(&t.mapping)
                    .filter(|(e, _)| {
                        !matches!(e, handlebars::template::TemplateElement::RawString(_))
                    })
                    .map(|(_, m)| (m.0, m.1))
                    .collect()
            };
            assert_eq!(positions(&pieces), positions(&whole), "{text:?}");
            assert_eq!(render(pieces), render(whole), "{text:?}");
        }
        // A piece that does not compile alone sends the whole text to
        // Handlebars, which reports the error where it is.
        let e = Templates::compile(&[(
            "t.hbs".into(),
            format!("{}\n{{{{#if x}}}}\n", "a\n".repeat(2000)),
        )])
        .err()
        .unwrap();
        assert!(e[0].line.is_some_and(|l| l >= 2002), "{e:?}");
    }

    /// Random templates from pieces of the grammar: wherever Handlebars
    /// parses one, the scan counts at least the nesting it parsed, and the
    /// pieces compile to a template that renders the same.
    #[test]
    fn the_scan_agrees_with_handlebars_on_random_templates() {
        use handlebars::template::Template;
        use proptest::prelude::*;
        let leaf = prop::sample::select(vec![
            "{{x}}",
            "{{y}}",
            "\n",
            "\n",
            "  ",
            "a",
            "{{~x}}",
            "{{x~}}",
            "{{!-- c }} --}}",
            "{{! c }}",
            "\\{{x}}",
            "\\\\",
            "{{{x}}}",
            "{{this}}",
            "\r\n",
            "{{&y}}",
            "{{lookup x (concat \"a(\" (concat y \"[\"))}}",
            "{{x \"}\"}}",
            "\"",
            "'",
            "}}",
            "{{{{raw}}}}\n{{x}} {{#if}}\n{{{{/raw}}}}",
            "{{> p}}",
            "{{~> p~}}",
            "\\{{{{x}}",
        ])
        .prop_map(str::to_string);
        let fragment = leaf.prop_recursive(4, 64, 6, |inner| {
            let body = prop::collection::vec(inner, 0..6).prop_map(|v| v.concat());
            (
                prop::sample::select(vec![
                    ("{{#if t}}", "{{else}}", "{{/if}}"),
                    ("{{#if f}}", "{{else if t}}", "{{/if}}"),
                    ("{{~#each l~}}", "{{^}}", "{{~/each~}}"),
                    ("{{#with x}}", "{{else}}", "{{/with}}"),
                    ("{{#unless f}}", "{{else}}", "{{/unless}}"),
                    ("{{#*inline \"p\"}}", "", "{{/inline}}"),
                ]),
                body.clone(),
                body,
            )
                .prop_map(|((open, middle, close), a, b)| {
                    if middle.is_empty() {
                        format!("{open}{a}{close}")
                    } else {
                        format!("{open}{a}{middle}{b}{close}")
                    }
                })
        });
        let data = json!({"x": "X", "y": "Y", "t": true, "f": false, "l": [1, 2]});
        let render = |t: Template| {
            let mut h = Handlebars::new();
            h.register_escape_fn(handlebars::no_escape);
            h.register_template("t", t);
            h.render("t", &data).ok()
        };
        let parsed = std::sync::atomic::AtomicUsize::new(0);
        // 1,000 cases, or `PROPTEST_CASES` for a longer run.
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000u32);
        let config = proptest::test_runner::Config::with_cases(cases);
        proptest!(config, |(parts in prop::collection::vec(fragment, 0..20))| {
            let text = parts.concat();
            let Ok(whole) = Template::compile_with_name(&text, "t".into()) else {
                return Ok(());
            };
            parsed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (depth, _) = limits::nesting(&whole, usize::MAX);
            if depth > 0 {
                prop_assert!(
                    scan::scan(&text, depth - 1, 0).too_deep.is_some(),
                    "the scan missed nesting {depth} in {text:?}"
                );
            }
            let cuts = scan::scan(&text, MAX_DEPTH, 1).cuts;
            let pieces = scan::compile_pieces("t", &text, &cuts);
            prop_assert!(pieces.is_some(), "a piece did not compile: {text:?} {cuts:?}");
            // A partial including itself would overflow the stack here.
            if limits::check_partials(&[("t", &whole)]).is_empty() {
                prop_assert_eq!(render(pieces.unwrap()), render(whole), "{:?} {:?}", text, cuts);
            }
        });
        let parsed = parsed.into_inner();
        eprintln!("{parsed} of {cases} random templates parsed");
        assert!(
            parsed > cases as usize / 2,
            "only {parsed} random templates parsed"
        );
    }
}
