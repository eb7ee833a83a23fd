//! One pass over a template's text before Handlebars parses it.
//!
//! Handlebars' parser recurses once per level of nesting (blocks, `else`
//! chains, subexpressions, list and map literals), so a template nested
//! deeply enough overflows the stack while it is being parsed. This pass
//! follows the grammar closely enough to count that nesting without
//! recursing, and stops at the first place deeper than the limit, with its
//! line and column.
//!
//! It also finds where the text can be cut into pieces that compile on their
//! own to the same elements: Handlebars computes the line and column of
//! every token from the start of its input, so compiling a large template
//! whole takes time that grows with the square of its size, and compiling it
//! in pieces of bounded size does not. A cut is made only at the top level,
//! outside any block, comment, raw block or expression, and only where no
//! whitespace control (`~`) or standalone-line rule can reach across it.

use handlebars::template::{Template, TemplateElement};

/// Where the text may be cut, with the line and column there (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub offset: usize,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Default)]
pub struct Scan {
    /// The first place nested deeper than the limit: line and column.
    pub too_deep: Option<(usize, usize)>,
    /// Cuts at least `piece` bytes apart, in order.
    pub cuts: Vec<Cut>,
}

/// What a mustache is, as far as nesting and cutting go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// `{{name …}}`: a plain expression, the only tag a cut may follow or
    /// precede on the same line.
    Plain,
    Open,
    Close,
    Chain,
    Other,
}

struct Lexer<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    line: usize,
    line_start: usize,
}

impl Lexer<'_> {
    fn at(&self, s: &str) -> bool {
        self.b[self.i..].starts_with(s.as_bytes())
    }

    fn column(&self, offset: usize) -> usize {
        self.text[self.line_start..offset].chars().count() + 1
    }

    /// Moves to `to`, counting the lines passed.
    fn advance(&mut self, to: usize) {
        let to = to.min(self.b.len());
        for j in self.i..to {
            if self.b[j] == b'\n' {
                self.line += 1;
                self.line_start = j + 1;
            }
        }
        self.i = to;
    }

    fn find(&self, from: usize, needle: &str) -> Option<usize> {
        self.text
            .get(from..)
            .and_then(|rest| rest.find(needle))
            .map(|k| from + k)
    }

    /// The number of backslashes right before `at`.
    fn backslashes_before(&self, at: usize) -> usize {
        self.b[..at]
            .iter()
            .rev()
            .take_while(|&&c| c == b'\\')
            .count()
    }

    /// The end of the raw text of a raw block whose content starts at
    /// `from`: the first `{{{{` not escaped by a single backslash.
    fn raw_block_end(&self, from: usize) -> Option<usize> {
        let mut k = from;
        loop {
            let at = self.find(k, "{{{{")?;
            if self.backslashes_before(at) == 1 {
                k = at + 4;
            } else {
                return Some(at);
            }
        }
    }
}

fn is_symbol(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'$' | b':') || c >= 0x80
}

/// Scans `text`; `max_depth` bounds nesting, `piece` is the least distance
/// between two cuts (0: no cuts).
pub fn scan(text: &str, max_depth: usize, piece: usize) -> Scan {
    let mut lx = Lexer {
        text,
        b: text.as_bytes(),
        i: 0,
        line: 1,
        line_start: 0,
    };
    let n = lx.b.len();
    let mut out = Scan::default();
    // Open blocks, each with the number of `else` chains it holds: a chain
    // nests one level deeper until the block closes.
    let mut frames: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut last_cut = 0usize;
    // The last tag: its kind, where it ended, and whether it trims the
    // whitespace after it (`~}}`).
    let mut last_tag = Tag::Other;
    let mut last_end = 0usize;
    let mut last_trims = false;
    while lx.i < n {
        let c = lx.b[lx.i];
        if c == b'\n' {
            lx.advance(lx.i + 1);
            let p = lx.i;
            if piece > 0
                && frames.is_empty()
                && p < n
                && p - last_cut >= piece
                && cut_allowed_at_line_start(&lx, p)
                && !(last_trims && lx.text[last_end..p].trim().is_empty())
            {
                out.cuts.push(Cut {
                    offset: p,
                    line: lx.line,
                    column: 1,
                });
                last_cut = p;
            }
            continue;
        }
        if !lx.at("{{") {
            lx.i += 1;
            continue;
        }
        let start = lx.i;
        // `\{{` is text; two or more backslashes are text and a real `{{`.
        if lx.backslashes_before(start) == 1 {
            let skip = if lx.b[start + 2..].starts_with(b"{{") {
                4
            } else {
                2
            };
            lx.advance(start + skip);
            continue;
        }
        let (line, column) = (lx.line, lx.column(start));
        // A mid-line cut: right after a plain expression, before another.
        if piece > 0
            && frames.is_empty()
            && last_tag == Tag::Plain
            && !last_trims
            && last_end == start
            && start - last_cut >= piece
            && plain_at(lx.b, start)
        {
            out.cuts.push(Cut {
                offset: start,
                line,
                column,
            });
            last_cut = start;
        }
        if lx.at("{{{{") {
            // A raw block: its content is text up to the end tag.
            if depth + 1 > max_depth {
                out.too_deep = Some((line, column));
                return out;
            }
            let Some(open_end) = lx.find(start + 4, "}}}}") else {
                break;
            };
            let Some(content_end) = lx.raw_block_end(open_end + 4) else {
                break;
            };
            let Some(close_end) = lx.find(content_end + 4, "}}}}") else {
                break;
            };
            lx.advance(close_end + 4);
            last_tag = Tag::Other;
            last_end = lx.i;
            last_trims = lx.b[close_end.saturating_sub(1)] == b'~';
            continue;
        }
        if lx.at("{{!") {
            let end = if lx.at("{{!--") {
                lx.find(start + 5, "--}}")
                    .map(|k| k + 4)
                    .or_else(|| lx.find(start + 3, "}}").map(|k| k + 2))
            } else {
                lx.find(start + 3, "}}").map(|k| k + 2)
            };
            let Some(end) = end else { break };
            lx.advance(end);
            last_tag = Tag::Other;
            last_end = end;
            last_trims = false;
            continue;
        }
        let mut j = start + 2;
        if lx.b.get(j) == Some(&b'~') {
            j += 1;
        }
        let triple = lx.b.get(j) == Some(&b'{');
        // Handlebars allows space around the `~` and before `#`, `/`, `^`
        // or `else`: `{{ #if x}}` and `{{ ~ #if x}}` open blocks all the
        // same.
        let space = |mut j: usize| {
            while lx.b.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            j
        };
        j = space(j);
        if lx.b.get(j) == Some(&b'~') {
            j = space(j + 1);
        }
        let tag = match lx.b.get(j).copied() {
            Some(b'#') => Tag::Open,
            Some(b'/') => Tag::Close,
            Some(b'^') => {
                if ends_soon(lx.b, j + 1) {
                    Tag::Other
                } else {
                    Tag::Chain
                }
            }
            Some(b'e')
                if lx.b[j..].starts_with(b"else")
                    && !lx.b.get(j + 4).is_some_and(|&c| is_symbol(c)) =>
            {
                if ends_soon(lx.b, j + 4) {
                    Tag::Other
                } else {
                    Tag::Chain
                }
            }
            Some(c) if c.is_ascii_alphabetic() => Tag::Plain,
            _ => Tag::Other,
        };
        match tag {
            Tag::Open => {
                frames.push(0);
                depth += 1;
            }
            Tag::Close => {
                let chains = frames.pop().unwrap_or(0);
                depth = depth.saturating_sub(1 + chains);
            }
            Tag::Chain => {
                if let Some(chains) = frames.last_mut() {
                    *chains += 1;
                    depth += 1;
                }
            }
            Tag::Plain | Tag::Other => {}
        }
        if depth > max_depth {
            out.too_deep = Some((line, column));
            return out;
        }
        // The expression's body, to its closing braces: strings are skipped,
        // brackets of subexpressions and literals counted.
        let mut k = j + usize::from(triple);
        let mut brackets = 0usize;
        let end = loop {
            let Some(&c) = lx.b.get(k) else { break None };
            match c {
                b'"' | b'\'' => {
                    k += 1;
                    while let Some(&d) = lx.b.get(k) {
                        if d == b'\\' {
                            k += 2;
                        } else if d == c {
                            break;
                        } else {
                            k += 1;
                        }
                    }
                    if k >= n {
                        break None;
                    }
                    k += 1;
                }
                b'(' | b'[' | b'{' => {
                    brackets += 1;
                    if depth + brackets > max_depth {
                        lx.advance(k);
                        out.too_deep = Some((lx.line, lx.column(k)));
                        return out;
                    }
                    k += 1;
                }
                b'}' if brackets == 0 => {
                    if triple {
                        // `}` `~`? `}}`
                        let mut m = k + 1;
                        if lx.b.get(m) == Some(&b'~') {
                            m += 1;
                        }
                        if lx.b[m.min(n)..].starts_with(b"}}") {
                            break Some(m + 2);
                        }
                        k += 1;
                    } else if lx.b[k..].starts_with(b"}}") {
                        break Some(k + 2);
                    } else {
                        k += 1;
                    }
                }
                b')' | b']' | b'}' => {
                    brackets = brackets.saturating_sub(1);
                    k += 1;
                }
                _ => k += 1,
            }
        };
        let Some(end) = end else { break };
        last_trims = lx.b[..end - 2].ends_with(b"~") || (triple && lx.b[..end - 3].ends_with(b"~"));
        lx.advance(end);
        last_tag = tag;
        last_end = end;
    }
    out
}

/// After `{{^` or `{{else`: only whitespace, `~` and the closing braces.
fn ends_soon(b: &[u8], from: usize) -> bool {
    b[from.min(b.len())..]
        .iter()
        .find(|c| !c.is_ascii_whitespace())
        .is_none_or(|&c| c == b'~' || c == b'}')
}

/// A plain expression starts at `at`: `{{` and a letter, not `else`. Only
/// between two of these may a piece be cut in the middle of a line: any
/// other tag could be standalone at the end or the start of a piece.
fn plain_at(b: &[u8], at: usize) -> bool {
    let rest = &b[at..];
    let is_else = rest.get(2..6) == Some(b"else") && !rest.get(6).is_some_and(|&c| is_symbol(c));
    rest.starts_with(b"{{") && rest.get(2).is_some_and(u8::is_ascii_alphabetic) && !is_else
}

/// A line may start a piece unless what comes first on it, after any
/// whitespace, is `{{~`, which trims the whitespace before it, back across
/// the cut. Handlebars treats the start of its input as the start of a line
/// (a tag alone on it is standalone there too), so a cut at a line start
/// changes nothing else. Whitespace is looked through for a few kB at most.
fn cut_allowed_at_line_start(lx: &Lexer<'_>, p: usize) -> bool {
    let rest = &lx.b[p..lx.b.len().min(p + 4096)];
    match rest.iter().position(|c| !c.is_ascii_whitespace()) {
        Some(k) => !rest[k..].starts_with(b"{{~"),
        None => false,
    }
}

/// Compiles a template in the pieces between `cuts`, giving the same
/// elements, at the same lines and columns, as compiling it whole. `None`
/// when a piece does not compile alone: the caller compiles the whole text,
/// which reports the error where it is.
pub fn compile_pieces(name: &str, text: &str, cuts: &[Cut]) -> Option<Template> {
    let mut whole = Template::new();
    whole.name = Some(name.to_string());
    let starts = std::iter::once(Cut {
        offset: 0,
        line: 1,
        column: 1,
    })
    .chain(cuts.iter().copied());
    let ends = cuts.iter().map(|c| c.offset).chain([text.len()]);
    for (start, end) in starts.zip(ends) {
        let mut piece =
            Template::compile_with_name(&text[start.offset..end], name.to_string()).ok()?;
        shift(&mut piece, start.line - 1, start.column - 1);
        whole.elements.append(&mut piece.elements);
        whole.mapping.append(&mut piece.mapping);
    }
    Some(whole)
}

/// Moves the positions of a piece's elements to where the piece starts.
fn shift(t: &mut Template, lines: usize, columns: usize) {
    let mut stack = vec![t];
    while let Some(t) = stack.pop() {
        for m in &mut t.mapping {
            if m.0 == 1 {
                m.1 += columns;
            }
            m.0 += lines;
        }
        for e in &mut t.elements {
            match e {
                TemplateElement::HelperBlock(h) => {
                    stack.extend([&mut h.template, &mut h.inverse].into_iter().flatten());
                }
                TemplateElement::DecoratorBlock(d) | TemplateElement::PartialBlock(d) => {
                    stack.extend(d.template.as_mut());
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, max: usize) -> bool {
        scan(text, max, 0).too_deep.is_none()
    }

    #[test]
    fn counts_blocks_chains_and_brackets() {
        assert!(depth_ok("{{#if a}}{{#if b}}x{{/if}}{{/if}}", 2));
        assert!(!depth_ok("{{#if a}}{{#if b}}x{{/if}}{{/if}}", 1));
        // Closed blocks do not add up.
        assert!(depth_ok(&"{{#if a}}x{{/if}}".repeat(50), 1));
        // Each else-if nests one more level until the block closes.
        assert!(!depth_ok("{{#if a}}{{else if b}}{{else if c}}{{/if}}", 2));
        assert!(depth_ok("{{#if a}}{{else}}{{else}}{{/if}}", 1));
        assert!(depth_ok("{{#if a}}{{^}}x{{/if}}", 1));
        assert!(!depth_ok("{{concat (concat (concat \"a\"))}}", 1));
        assert!(depth_ok("{{concat (concat (concat \"a\"))}}", 2));
        assert!(depth_ok("{{concat (concat \"(((\")}}", 1));
        assert_eq!(
            scan("a\n\n  {{#if x}}{{#if y}}", 1, 0).too_deep,
            Some((3, 12))
        );
    }

    #[test]
    fn space_before_the_tilde_still_opens_a_block() {
        // Handlebars reads `{{ ~#if a}}` and `{{ ~ #if a}}` as blocks: an
        // unclosed one does not compile, a closed one does.
        let mut hb = handlebars::Handlebars::new();
        assert!(hb.register_template_string("o", "{{ ~#if a}}x").is_err());
        assert!(
            hb.register_template_string("c", "{{ ~#if a}}x{{ ~ /if}}")
                .is_ok()
        );
        assert!(!depth_ok("{{ ~#if a}}{{ ~ #if b}}x{{ ~/if}}{{ ~/if}}", 1));
        assert!(depth_ok("{{ ~#if a}}{{ ~ #if b}}x{{ ~/if}}{{ ~/if}}", 2));
    }

    #[test]
    fn text_that_is_not_structure_does_not_count() {
        // Comments, raw blocks, escapes and strings hold no blocks.
        assert!(depth_ok("{{!-- {{#if a}} }} {{#if b}} --}}x", 0));
        assert!(depth_ok("{{! {{#if a}} }}x", 0));
        assert!(depth_ok("{{{{raw}}}}{{#if a}}{{#if b}}{{{{/raw}}}}", 1));
        assert!(depth_ok("\\{{#if a}}\\{{#if b}}", 0));
        assert!(!depth_ok("\\\\{{#if a}}\\\\{{#if b}}", 1));
        assert!(depth_ok("{{x \"{{#if a}}{{#if b}}\"}}", 0));
        // A close inside a string is not a close.
        assert!(!depth_ok(
            "{{#if a}}{{x \"{{/if}}\"}}{{#if b}}{{x '{{/if}}'}}{{#if c}}",
            2
        ));
    }

    #[test]
    fn cuts_only_at_the_top_level_between_safe_places() {
        let offsets = |text: &str| -> Vec<usize> {
            scan(text, 100, 1).cuts.iter().map(|c| c.offset).collect()
        };
        assert_eq!(offsets("a\nb\n"), [2]);
        assert_eq!(offsets("{{x}}{{y}}"), [5]);
        // Not inside a block, after `~}}` or before `{{~`; in the middle of
        // a line only between plain expressions.
        assert!(offsets("{{#if a}}\nb\n{{/if}}").is_empty());
        assert_eq!(offsets("a\n{{#if a}}b{{/if}}\n  c"), [2, 20]);
        assert!(offsets("{{x~}}\nb").is_empty());
        assert!(offsets("{{x}}{{~y}}").is_empty());
        assert!(offsets("a\n  \n {{~b}}").is_empty());
        assert!(offsets("{{x}}{{else}}").is_empty());
        assert!(offsets("{{#if a}}{{/if}}{{x}}").is_empty());
        assert!(offsets("{{!-- a\nb --}}").is_empty());
        let cut = scan("ab\ncd\n{{x}}{{y}}", 100, 1).cuts;
        assert_eq!(
            cut,
            [
                Cut {
                    offset: 3,
                    line: 2,
                    column: 1
                },
                Cut {
                    offset: 6,
                    line: 3,
                    column: 1
                },
                Cut {
                    offset: 11,
                    line: 3,
                    column: 6
                }
            ]
        );
        // `piece` spaces the cuts.
        assert_eq!(scan(&"a\n".repeat(100), 100, 50).cuts.len(), 3);
    }
}
