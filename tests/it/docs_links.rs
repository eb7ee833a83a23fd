//! The repository's Markdown links: every relative link must lead to a file
//! or directory that exists, and a `#anchor` must name a heading of the
//! target file (or of the same file) as GitHub spells it.
//!
//! Links in fenced code blocks and inline code are not links and are
//! skipped; so are links with a scheme (`https:`, `mailto:`, …). Reference
//! links are checked through their definitions, and a reference to a label
//! that no definition names is reported too.
//!
//! Std only: this file does not use the envrender library.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Directories never searched for Markdown: build output, version control,
/// and installed third-party packages (`.venv` is in `.gitignore`).
const SKIP_DIRS: &[&str] = &[".git", "target", "node_modules", ".venv"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `*.md` file below `dir`, sorted, without following symlinked
/// directories.
fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                if !SKIP_DIRS.contains(&name.as_ref()) {
                    pending.push(entry.path());
                }
            } else if name.to_ascii_lowercase().ends_with(".md") && entry.path().is_file() {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

// ---------------------------------------------------------------------------
// Slugs

/// GitHub's slug of a heading's text: lowercase; letters, digits, spaces,
/// hyphens and underscores kept, everything else dropped; each space a
/// hyphen.
fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Slugs for one document: a heading whose slug was already given gets
/// `-1`, `-2`, … (as github-slugger numbers them).
#[derive(Default)]
struct Slugger {
    seen: HashMap<String, usize>,
}

impl Slugger {
    fn slug(&mut self, text: &str) -> String {
        let base = slug(text);
        let mut candidate = base.clone();
        while self.seen.contains_key(&candidate) {
            let count = self.seen.get_mut(&base).expect("the base was seen first");
            *count += 1;
            candidate = format!("{base}-{count}");
        }
        self.seen.insert(candidate.clone(), 0);
        candidate
    }
}

/// The text a heading renders to: code spans keep their content, links and
/// images their text, and emphasis markers and HTML tags go.
fn inline_text(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if chars.get(i + 1).is_some_and(|n| n.is_ascii_punctuation()) => {
                out.push(chars[i + 1]);
                i += 2;
            }
            '`' => {
                let run = run_length(&chars, i, '`');
                match find_run(&chars, i + run, run, '`') {
                    Some(close) => {
                        let code: String = chars[i + run..close].iter().collect();
                        let trimmed =
                            if code.len() > 2 && code.starts_with(' ') && code.ends_with(' ') {
                                &code[1..code.len() - 1]
                            } else {
                                &code
                            };
                        out.push_str(trimmed);
                        i = close + run;
                    }
                    None => {
                        out.extend(&chars[i..i + run]);
                        i += run;
                    }
                }
            }
            '[' => match matching_bracket(&chars, i) {
                Some(close) if chars.get(close + 1) == Some(&'(') => {
                    let text: String = chars[i + 1..close].iter().collect();
                    out.push_str(&inline_text(&text));
                    i = match inline_destination(&chars, close + 2) {
                        Some((_, end)) => end,
                        None => close + 1,
                    };
                }
                Some(close) if chars.get(close + 1) == Some(&'[') => {
                    let text: String = chars[i + 1..close].iter().collect();
                    out.push_str(&inline_text(&text));
                    i = matching_bracket(&chars, close + 1).map_or(close + 1, |end| end + 1);
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            },
            '<' => {
                // An HTML tag is dropped; an autolink shows its address.
                let end = chars[i..].iter().position(|&c| c == '>').map(|p| i + p);
                match end {
                    Some(end)
                        if chars
                            .get(i + 1)
                            .is_some_and(|n| n.is_ascii_alphabetic() || *n == '/') =>
                    {
                        let inner: String = chars[i + 1..end].iter().collect();
                        if inner.contains(':') && !inner.contains(' ') {
                            out.push_str(&inner);
                        }
                        i = end + 1;
                    }
                    _ => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            '*' | '~' => i += 1,
            '_' => {
                // Emphasis (`_x_`, `__x__`) renders without its underscores;
                // an underscore inside a word (`snake_case`) stays.
                let before = i.checked_sub(1).map(|p| chars[p]);
                let after = chars.get(i + 1).copied();
                let opens = !before.is_some_and(char::is_alphanumeric)
                    && after.is_some_and(|a| !a.is_whitespace());
                let closes = !after.is_some_and(char::is_alphanumeric)
                    && before.is_some_and(|b| !b.is_whitespace());
                if !(opens || closes) {
                    out.push(c);
                }
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Markdown structure

/// For each line (split on `\n`), whether it belongs to a fenced code block,
/// fences included. A fence is three or more backticks or tildes; it closes
/// with a run of the same character at least as long. An unclosed fence runs
/// to the end of the document.
fn fenced_lines(text: &str) -> Vec<bool> {
    let mut fenced = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for line in text.split('\n') {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|&c| c == '`' || c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|&c| c == m).count());
        match (open, marker) {
            (None, Some(m)) if run >= 3 => {
                // A backtick fence's info string cannot hold a backtick.
                let info = &trimmed[run..];
                if m == '~' || !info.contains('`') {
                    open = Some((m, run));
                }
                fenced.push(open.is_some());
            }
            (None, _) => fenced.push(false),
            (Some((m, len)), Some(c))
                if c == m && run >= len && trimmed[run..].trim().is_empty() =>
            {
                open = None;
                fenced.push(true);
            }
            (Some(_), _) => fenced.push(true),
        }
    }
    fenced
}

fn run_length(chars: &[char], start: usize, c: char) -> usize {
    chars[start..].iter().take_while(|&&x| x == c).count()
}

/// Whether a paragraph ends at `i` (a newline followed by a blank line).
fn paragraph_ends(chars: &[char], i: usize) -> bool {
    if chars[i] != '\n' {
        return false;
    }
    let mut j = i + 1;
    while j < chars.len() && (chars[j] == ' ' || chars[j] == '\t' || chars[j] == '\r') {
        j += 1;
    }
    j >= chars.len() || chars[j] == '\n'
}

/// The start of the next run of exactly `len` `c`s from `from`, within the
/// paragraph.
fn find_run(chars: &[char], from: usize, len: usize, c: char) -> Option<usize> {
    let mut j = from;
    while j < chars.len() {
        if chars[j] == c {
            let run = run_length(chars, j, c);
            if run == len {
                return Some(j);
            }
            j += run;
        } else if paragraph_ends(chars, j) {
            return None;
        } else {
            j += 1;
        }
    }
    None
}

/// The document with fenced code blocks emptied and inline code spans
/// blanked, newlines kept, so that line numbers still hold.
fn masked(text: &str) -> Vec<char> {
    let fenced = fenced_lines(text);
    let mut chars = Vec::with_capacity(text.len());
    for (n, line) in text.split('\n').enumerate() {
        if n > 0 {
            chars.push('\n');
        }
        if !fenced[n] {
            chars.extend(line.chars());
        }
    }
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '`' => {
                let run = run_length(&chars, i, '`');
                match find_run(&chars, i + run, run, '`') {
                    Some(close) => {
                        for c in &mut chars[i..close + run] {
                            if *c != '\n' {
                                *c = ' ';
                            }
                        }
                        i = close + run;
                    }
                    None => i += run,
                }
            }
            _ => i += 1,
        }
    }
    chars
}

/// The `]` that closes the `[` at `open`, within the paragraph.
fn matching_bracket(chars: &[char], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = open;
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 1,
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            '\n' if paragraph_ends(chars, j) => return None,
            _ => {}
        }
        j += 1;
    }
    None
}

/// An inline link's destination, from just after its `(`: the destination
/// as written and the index just past the closing `)`.
fn inline_destination(chars: &[char], start: usize) -> Option<(String, usize)> {
    let skip_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() && !paragraph_ends(chars, j) {
            j += 1;
        }
        j
    };
    let mut j = skip_space(start);
    let mut dest = String::new();
    if chars.get(j) == Some(&'<') {
        j += 1;
        while j < chars.len() && chars[j] != '>' {
            if chars[j] == '\n' || chars[j] == '<' {
                return None;
            }
            dest.push(chars[j]);
            j += 1;
        }
        j += 1;
    } else {
        let mut depth = 0usize;
        while j < chars.len() {
            let c = chars[j];
            if c == '\\' && j + 1 < chars.len() {
                dest.push(c);
                dest.push(chars[j + 1]);
                j += 2;
                continue;
            }
            if c.is_whitespace() || c.is_control() {
                break;
            }
            if c == '(' {
                depth += 1;
            } else if c == ')' {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            dest.push(c);
            j += 1;
        }
    }
    j = skip_space(j);
    if let Some(&quote) = chars.get(j).filter(|&&c| c == '"' || c == '\'' || c == '(') {
        let close = if quote == '(' { ')' } else { quote };
        j += 1;
        while j < chars.len() && chars[j] != close {
            if chars[j] == '\\' {
                j += 1;
            }
            j += 1;
        }
        j = skip_space(j + 1);
    }
    (chars.get(j) == Some(&')')).then_some((dest, j + 1))
}

/// A reference label as CommonMark matches it: case-folded, inner
/// whitespace collapsed.
fn normalize_label(label: &str) -> String {
    label
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Removes the backslash from backslash escapes.
fn unescape(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek().is_some_and(char::is_ascii_punctuation) {
            continue;
        }
        out.push(c);
    }
    out
}

/// One link found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    /// `[text](target)` or `![alt](target)`, and `[label]: target`.
    Target { line: usize, target: String },
    /// `[text][label]` or `[label][]` whose label no definition names.
    Undefined { line: usize, label: String },
}

/// Every link of a Markdown document, outside code.
fn links(text: &str) -> Vec<Link> {
    let chars = masked(text);
    let newlines: Vec<usize> = chars
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == '\n')
        .map(|(i, _)| i)
        .collect();
    let line_of = |i: usize| newlines.partition_point(|&n| n < i) + 1;

    // Definitions: `[label]: destination` at the start of a line.
    let masked_text: String = chars.iter().collect();
    let mut definitions: HashMap<String, (usize, String)> = HashMap::new();
    for (n, line) in masked_text.split('\n').enumerate() {
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() > 3 || !trimmed.starts_with('[') || trimmed.starts_with("[^")
        {
            continue;
        }
        let Some(end) = trimmed.find("]:") else {
            continue;
        };
        let label = &trimmed[1..end];
        let rest = trimmed[end + 2..].trim();
        let dest = match rest.strip_prefix('<') {
            Some(inner) => inner.split('>').next().unwrap_or(""),
            None => rest.split_whitespace().next().unwrap_or(""),
        };
        if label.trim().is_empty() || dest.is_empty() {
            continue;
        }
        definitions
            .entry(normalize_label(label))
            .or_insert((n + 1, dest.to_string()));
    }

    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                i += 2;
                continue;
            }
            '[' => {
                if let Some(close) = matching_bracket(&chars, i) {
                    let text: String = chars[i + 1..close].iter().collect();
                    match chars.get(close + 1) {
                        Some('(') => {
                            if let Some((target, _)) = inline_destination(&chars, close + 2) {
                                found.push(Link::Target {
                                    line: line_of(i),
                                    target,
                                });
                            }
                        }
                        Some('[') if !text.starts_with('^') => {
                            if let Some(end) = matching_bracket(&chars, close + 1) {
                                let label: String = chars[close + 2..end].iter().collect();
                                let label = if label.trim().is_empty() { text } else { label };
                                if !definitions.contains_key(&normalize_label(&label)) {
                                    found.push(Link::Undefined {
                                        line: line_of(i),
                                        label,
                                    });
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    for (line, target) in definitions.into_values() {
        found.push(Link::Target { line, target });
    }
    found.sort_by_key(|link| match link {
        Link::Target { line, .. } | Link::Undefined { line, .. } => *line,
    });
    found
}

fn atx_heading(line: &str) -> Option<&str> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.chars().take_while(|&c| c == '#').count();
    let rest = &trimmed[level..];
    if level == 0 || level > 6 || !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let content = rest.trim();
    let without_closing = content.trim_end_matches('#');
    Some(if without_closing.is_empty() {
        ""
    } else if without_closing.ends_with([' ', '\t']) {
        without_closing.trim_end()
    } else {
        content
    })
}

fn is_setext_underline(line: &str) -> bool {
    let trimmed = line.trim_start_matches(' ');
    let body = trimmed.trim_end();
    line.len() - trimmed.len() <= 3
        && !body.is_empty()
        && (body.chars().all(|c| c == '=') || body.chars().all(|c| c == '-'))
}

/// A line that may only be paragraph text (not a heading, list item, quote,
/// table row, fence, HTML block or thematic break).
fn is_paragraph_text(line: &str) -> bool {
    let trimmed = line.trim_start();
    if trimmed.is_empty() || line.len() - trimmed.len() > 3 {
        return false;
    }
    let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
    let bullet = trimmed.starts_with(['-', '*', '+']) && trimmed[1..].starts_with([' ', '\t']);
    let ordered = digits > 0
        && trimmed[digits..].starts_with(['.', ')'])
        && trimmed[digits + 1..].starts_with([' ', '\t']);
    let rule = {
        let compact: Vec<char> = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
        compact.len() >= 3
            && ['-', '*', '_']
                .iter()
                .any(|&m| compact.iter().all(|&c| c == m))
    };
    !(bullet
        || ordered
        || rule
        || is_setext_underline(line)
        || atx_heading(line).is_some()
        || trimmed.starts_with(['>', '|', '<'])
        || trimmed.starts_with("```")
        || trimmed.starts_with("~~~"))
}

/// The anchors a Markdown document offers: its headings' slugs (ATX and
/// setext) and the `id`/`name` of HTML anchors.
fn anchors(text: &str) -> HashSet<String> {
    let fenced = fenced_lines(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut slugger = Slugger::default();
    let mut found = HashSet::new();
    for (n, line) in lines.iter().enumerate() {
        if fenced[n] {
            continue;
        }
        let unquoted = line.trim_start().trim_start_matches(['>', ' ']);
        if let Some(heading) = atx_heading(line).or_else(|| atx_heading(unquoted)) {
            found.insert(slugger.slug(&inline_text(heading)));
        } else if is_setext_underline(line) && n > 0 {
            let mut start = n;
            while start > 0 && !fenced[start - 1] && is_paragraph_text(lines[start - 1]) {
                start -= 1;
            }
            let starts_block =
                start == 0 || lines[start - 1].trim().is_empty() || fenced[start - 1];
            if start < n && starts_block {
                let heading = lines[start..n]
                    .iter()
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join(" ");
                found.insert(slugger.slug(&inline_text(&heading)));
            }
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = *line;
            while let Some(tag) = rest.find("<a ") {
                rest = &rest[tag + 3..];
                let tag_end = rest.find('>').unwrap_or(rest.len());
                if let Some(at) = rest[..tag_end].find(attr) {
                    let value = &rest[at + attr.len()..];
                    if let Some(end) = value.find('"') {
                        found.insert(value[..end].to_string());
                    }
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// Checking

#[derive(Debug, PartialEq, Eq)]
struct Broken {
    file: PathBuf,
    line: usize,
    link: String,
    reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.link,
            self.reason
        )
    }
}

fn has_scheme(target: &str) -> bool {
    if target.starts_with("//") {
        return true;
    }
    match target.find(':') {
        Some(colon) => {
            let scheme = &target[..colon];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }
        None => false,
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` with `.` and `..` worked out, without touching the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn is_markdown(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("md") || e.eq_ignore_ascii_case("markdown"))
}

/// GitHub's line anchors on a file that is not Markdown: `L10`, `L10-L20`.
fn is_line_anchor(fragment: &str) -> bool {
    let line = |s: &str| {
        s.strip_prefix('L')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match fragment.split_once('-') {
        Some((a, b)) => line(a) && line(b),
        None => line(fragment),
    }
}

struct Checker {
    root: PathBuf,
    anchors: HashMap<PathBuf, HashSet<String>>,
}

impl Checker {
    fn new(root: &Path) -> Self {
        Checker {
            root: root.to_path_buf(),
            anchors: HashMap::new(),
        }
    }

    fn anchors_of(&mut self, file: &Path) -> &HashSet<String> {
        self.anchors
            .entry(file.to_path_buf())
            .or_insert_with(|| anchors(&fs::read_to_string(file).unwrap_or_default()))
    }

    fn relative<'a>(&self, path: &'a Path) -> &'a Path {
        path.strip_prefix(&self.root).unwrap_or(path)
    }

    /// Why `target`, linked from `file`, does not resolve; `None` when it does
    /// or is not a relative link.
    fn problem(&mut self, file: &Path, target: &str) -> Option<String> {
        let target = target.trim();
        if target.is_empty() || has_scheme(target) {
            return None;
        }
        let (path, fragment) = match target.split_once('#') {
            Some((path, fragment)) => (path, Some(percent_decode(fragment))),
            None => (target, None),
        };
        let path = percent_decode(&unescape(path.split('?').next().unwrap_or("")));
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else if let Some(from_root) = path.strip_prefix('/') {
            lexical(&self.root.join(from_root))
        } else {
            lexical(&file.parent().unwrap_or(&self.root).join(&path))
        };
        if !resolved.starts_with(&self.root) {
            return Some("leads outside the repository".to_string());
        }
        if !resolved.exists() {
            return Some(format!(
                "{} does not exist",
                self.relative(&resolved).display()
            ));
        }
        let fragment = fragment.filter(|f| !f.is_empty())?;
        let page = if resolved.is_dir() {
            resolved.join("README.md")
        } else {
            resolved
        };
        if !page.is_file() {
            return Some(format!(
                "#{fragment}: {} has no README.md to hold it",
                self.relative(&page).display()
            ));
        }
        if !is_markdown(&page) {
            return (!is_line_anchor(&fragment)).then(|| {
                format!(
                    "#{fragment}: {} is not Markdown",
                    self.relative(&page).display()
                )
            });
        }
        if self.anchors_of(&page).contains(&fragment) {
            return None;
        }
        let shown = self.relative(&page).display().to_string();
        Some(format!("no heading of {shown} has the anchor #{fragment}"))
    }

    fn check(&mut self, files: &[PathBuf]) -> Vec<Broken> {
        let mut broken = Vec::new();
        for file in files {
            let text =
                fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for link in links(&text) {
                let (line, shown, reason) = match link {
                    Link::Target { line, target } => match self.problem(file, &target) {
                        Some(reason) => (line, format!("({target})"), reason),
                        None => continue,
                    },
                    Link::Undefined { line, label } => (
                        line,
                        format!("[{label}]"),
                        "no reference definition has this label".to_string(),
                    ),
                };
                broken.push(Broken {
                    file: self.relative(file).to_path_buf(),
                    line,
                    link: shown,
                    reason,
                });
            }
        }
        broken
    }
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn every_relative_link_in_the_repository_resolves() {
    let root = repo_root();
    let files = markdown_files(&root);
    assert!(
        files.contains(&root.join("README.md")),
        "README.md not found among {files:?}"
    );
    let broken = Checker::new(&root).check(&files);
    let list: Vec<String> = broken.iter().map(|b| format!("  {b}")).collect();
    assert!(
        broken.is_empty(),
        "{} broken link(s) in {} Markdown files:\n{}",
        broken.len(),
        files.len(),
        list.join("\n")
    );
}

#[test]
fn slugs_follow_github() {
    let cases = [
        ("`watch`: the sidecar", "watch-the-sidecar"),
        ("`run`: the wrapper and PID 1", "run-the-wrapper-and-pid-1"),
        (
            "Reliability and security: what was tried",
            "reliability-and-security-what-was-tried",
        ),
        ("Local values (airplane mode)", "local-values-airplane-mode"),
        (
            "AWS: SSM Parameter Store, Secrets Manager, KMS",
            "aws-ssm-parameter-store-secrets-manager-kms",
        ),
        ("`check`", "check"),
        (
            "`max_answer_size` and snake_case",
            "max_answer_size-and-snake_case",
        ),
        (
            "A *bold* _move_ with [a link](docs/x.md#y)",
            "a-bold-move-with-a-link",
        ),
        ("Init container → sidecar", "init-container--sidecar"),
        ("Déjà vu", "déjà-vu"),
    ];
    for (heading, expected) in cases {
        assert_eq!(slug(&inline_text(heading)), expected, "heading {heading:?}");
    }
    let page = anchors("# Title\n\n## `watch`: the sidecar\n\ntext\n");
    assert!(page.contains("watch-the-sidecar"), "{page:?}");
}

#[test]
fn repeated_headings_are_numbered() {
    let mut slugger = Slugger::default();
    let got: Vec<String> = ["Limits", "Limits", "Limits-1", "Limits"]
        .iter()
        .map(|h| slugger.slug(h))
        .collect();
    assert_eq!(got, ["limits", "limits-1", "limits-1-1", "limits-2"]);

    let page = anchors("# A\n\n## Notes\n\n```md\n## Notes\n```\n\n## Notes\n\nSetext\n------\n");
    let mut page: Vec<&str> = page.iter().map(String::as_str).collect();
    page.sort_unstable();
    assert_eq!(page, ["a", "notes", "notes-1", "setext"]);
}

#[test]
fn links_in_code_are_not_links() {
    let text = "\
See [one](a.md) and `[two](b.md)` and ``x [three](c.md) y``.
[four
across lines](d.md#x \"title\") ![five](img/e.png)

```sh
[six](f.md)
```

  ~~~
  [seven](g.md)
  ~~~
[eight][ref], [nine][] and [undefined][nope]; [text] [^1] [x](<h i.md>)

[ref]: j.md#k
[nine]: <l.md>
[^1]: a footnote, not a link
";
    let found = links(text);
    let targets: Vec<(usize, &str)> = found
        .iter()
        .filter_map(|l| match l {
            Link::Target { line, target } => Some((*line, target.as_str())),
            Link::Undefined { .. } => None,
        })
        .collect();
    assert_eq!(
        targets,
        [
            (1, "a.md"),
            (2, "d.md#x"),
            (3, "img/e.png"),
            (12, "h i.md"),
            (14, "j.md#k"),
            (15, "l.md")
        ]
    );
    let undefined: Vec<&Link> = found
        .iter()
        .filter(|l| matches!(l, Link::Undefined { .. }))
        .collect();
    assert_eq!(
        undefined,
        [&Link::Undefined {
            line: 12,
            label: "nope".to_string()
        }]
    );
}

#[test]
fn broken_links_are_reported_with_file_and_line() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let root = std::env::temp_dir().join(format!(
        "envrender-docs-links-{}-{nanos}",
        std::process::id()
    ));
    fs::create_dir_all(root.join("docs")).unwrap();
    fs::create_dir_all(root.join("target")).unwrap();
    fs::write(
        root.join("README.md"),
        "# Top\n\n[guide](docs/guide.md#second-part) [gone](docs/gone.md) [bad](docs/guide.md#nope)\n\
         [self](#top) [self bad](#bottom) [dir](docs/) [web](https://example.com/x.md#y) [mail](mailto:a@b.c)\n\
         `[code](missing.md)` [up](../outside.md) [ref][r]\n\n[r]: docs/none.md\n",
    )
    .unwrap();
    fs::write(
        root.join("docs/guide.md"),
        "# Guide\n\n## Second part\n\n[back](../README.md#top)\n",
    )
    .unwrap();
    fs::write(root.join("target/skipped.md"), "[skipped](nowhere.md)\n").unwrap();

    let files = markdown_files(&root);
    let broken = Checker::new(&root).check(&files);
    fs::remove_dir_all(&root).unwrap();

    let got: Vec<String> = broken.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "README.md:3: (docs/gone.md): docs/gone.md does not exist",
            "README.md:3: (docs/guide.md#nope): no heading of docs/guide.md has the anchor #nope",
            "README.md:4: (#bottom): no heading of README.md has the anchor #bottom",
            "README.md:5: (../outside.md): leads outside the repository",
            "README.md:7: (docs/none.md): docs/none.md does not exist",
        ]
    );
}
