//! Every citation of a Markdown section in the repository resolves.
//!
//! Code comments, guides and scripts cite measurements by anchor (a Markdown file name, `#`, an
//! anchor: the performance report and its notes, the guides). This test finds each such citation
//! in the repository's text files and checks that the file exists and has that anchor, either an
//! explicit `<a id="…">` or a heading whose GitHub slug it is. Same-file links of the form
//! `](#anchor)` in Markdown files are checked too. A section renamed or moved without its
//! citations fails `cargo test` here instead of leaving a dead link.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Files and directories searched for citations, relative to the repository root.
const ROOTS: &[&str] = &[
    "README.md",
    "PERF.md",
    "CHANGELOG.md",
    "Cargo.toml",
    "docs",
    "src",
    "examples",
    "tests",
    "benches",
    "loadtest",
    "fuzz",
    ".ci",
];

/// Directories never searched: build output and fuzzing data.
const SKIP_DIRS: &[&str] = &["target", "corpus", "artifacts", "node_modules", ".git"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let p = entry.path();
        if p.is_dir() {
            let name = entry.file_name();
            if SKIP_DIRS.iter().any(|s| name == *s) {
                continue;
            }
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn is_anchor_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

/// A citation found in a file: the Markdown file named (as written), the anchor, the line.
struct Citation {
    target: String,
    anchor: String,
    line: usize,
}

/// Every `NAME.md#anchor` in `text`, and for a Markdown file every `](#anchor)`.
fn citations(text: &str, markdown: bool) -> Vec<Citation> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(pos) = line[from..].find(".md#") {
            let dot = from + pos;
            let start = line[..dot]
                .char_indices()
                .rev()
                .take_while(|&(_, c)| is_path_char(c))
                .last()
                .map_or(dot, |(i, _)| i);
            let anchor_start = dot + ".md#".len();
            let anchor: String = line[anchor_start..]
                .chars()
                .take_while(|&c| is_anchor_char(c))
                .collect();
            let name = &line[start..dot];
            if !name.is_empty() && !anchor.is_empty() {
                found.push(Citation {
                    target: format!("{name}.md"),
                    anchor,
                    line: index + 1,
                });
            }
            from = anchor_start;
        }
        if markdown {
            let mut from = 0;
            while let Some(pos) = line[from..].find("](#") {
                let anchor_start = from + pos + "](#".len();
                let anchor: String = line[anchor_start..]
                    .chars()
                    .take_while(|&c| is_anchor_char(c))
                    .collect();
                if !anchor.is_empty() {
                    found.push(Citation {
                        target: String::new(),
                        anchor,
                        line: index + 1,
                    });
                }
                from = anchor_start;
            }
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation other than `-` and `_`
/// dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors a Markdown file defines: `<a id="…">` and its headings' slugs (outside fenced
/// code blocks).
fn anchors(text: &str) -> HashSet<String> {
    let mut set = HashSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find("<a id=\"") {
            let after = &rest[pos + "<a id=\"".len()..];
            if let Some(end) = after.find('"') {
                set.insert(after[..end].to_string());
                rest = &after[end..];
            } else {
                break;
            }
        }
        if trimmed.starts_with('#') {
            let heading = trimmed.trim_start_matches('#');
            if heading.starts_with(' ') {
                set.insert(slug(heading));
            }
        }
    }
    set
}

/// The cited file: relative to the citing file's directory if it exists there, else to the
/// repository root (code and guides cite `PERF.md` or `docs/…` from the root).
fn resolve(root: &Path, citing: &Path, target: &str) -> Option<PathBuf> {
    let dir = citing.parent().unwrap_or(root);
    [dir.join(target), root.join(target)]
        .into_iter()
        .find(|p| p.is_file())
}

#[test]
fn every_cited_markdown_anchor_exists() {
    let root = repo_root();
    let mut files = Vec::new();
    for r in ROOTS {
        collect_files(&root.join(r), &mut files);
    }
    let this_file = root.join(file!());
    let mut broken = Vec::new();
    let mut checked = 0usize;
    for file in &files {
        if file.ends_with("doc_links.rs") || *file == this_file {
            continue;
        }
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        let markdown = file.extension().is_some_and(|e| e == "md");
        for c in citations(&text, markdown) {
            checked += 1;
            let rel = file.strip_prefix(&root).unwrap_or(file).display();
            let target = if c.target.is_empty() {
                Some(file.clone())
            } else {
                resolve(&root, file, &c.target)
            };
            let Some(target) = target else {
                broken.push(format!(
                    "{rel}:{}: {}#{}: no such file",
                    c.line, c.target, c.anchor
                ));
                continue;
            };
            let defined = fs::read_to_string(&target)
                .map(|t| anchors(&t))
                .unwrap_or_default();
            if !defined.contains(&c.anchor) {
                broken.push(format!(
                    "{rel}:{}: {}#{}: no such anchor in {}",
                    c.line,
                    c.target,
                    c.anchor,
                    target.strip_prefix(&root).unwrap_or(&target).display()
                ));
            }
        }
    }
    assert!(
        checked > 0,
        "no citations found: is the repository root right?"
    );
    assert!(
        broken.is_empty(),
        "{} broken citation(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug(" Machine and method"), "machine-and-method");
    assert_eq!(
        slug(" Low rate: 1 000 subscribers × 80 publishes/s"),
        "low-rate-1-000-subscribers--80-publishess"
    );
    let defined = anchors("# Title\n<a id=\"x-y\"></a>\n```\n# not a heading\n```\n");
    assert!(defined.contains("title"));
    assert!(defined.contains("x-y"));
    assert!(!defined.contains("not-a-heading"));
}

#[test]
fn citations_are_found_in_prose_and_links() {
    let text = "see PERF.md#soak and [x](../docs/a.md#b-c), also [y](#z).";
    let found = citations(text, true);
    let pairs: Vec<_> = found
        .iter()
        .map(|c| (c.target.as_str(), c.anchor.as_str()))
        .collect();
    assert_eq!(
        pairs,
        vec![("PERF.md", "soak"), ("../docs/a.md", "b-c"), ("", "z")]
    );
}
