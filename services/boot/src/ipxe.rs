//! iPXE script generation, and escaping of kernel command lines for iPXE's parser.
//!
//! How iPXE reads a script line (src/image/script.c, src/core/exec.c, src/core/settings.c):
//! 1. Lines end at `\n`; one trailing `\r` is dropped; a trailing `\` joins the next line.
//! 2. A line whose first non-blank character is `:` is a label.
//! 3. The line is split into tokens at whitespace (`isspace`: space, `\t`, `\n`, `\v`, `\f`,
//!    `\r`). There is no quoting: `"` and `'` are ordinary characters.
//! 4. A token starting with `#` starts a comment; a token that is exactly `||`, `&&` or `;`
//!    separates commands.
//! 5. Each token is expanded on its own: `${name}` is replaced by the setting's value (empty
//!    when unset), and the scan restarts from the beginning of the token after every
//!    replacement, until no `${` is followed by a `}`.
//! 6. The `kernel` command joins the tokens after the image URL with one space each.
//!
//! So a command line is passed byte for byte by writing single spaces between words as
//! token separators and every other special byte (`$`, `;`, `#`, `\`, other whitespace, the
//! lone tokens `||`/`&&`) as a reference to a one-byte setting defined at the top of the
//! script (`set dg-dollar:hex 24` … `${dg-dollar:string}`). One thing cannot be passed at
//! all: a token whose text contains `${` followed later by `}` is always expanded (rule 5
//! re-scans expanded text too), whatever the escaping. Such command lines are refused with
//! [`CmdlineError::Unrepresentable`] instead of booting a silently different command line.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// A byte that has to go through a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Special {
    Dollar,
    Semicolon,
    Hash,
    Backslash,
    Pipe,
    Ampersand,
    Space,
    Tab,
    Newline,
    VerticalTab,
    FormFeed,
    CarriageReturn,
}

impl Special {
    fn of(c: char) -> Option<Special> {
        Some(match c {
            '$' => Special::Dollar,
            ';' => Special::Semicolon,
            '#' => Special::Hash,
            '\\' => Special::Backslash,
            ' ' => Special::Space,
            '\t' => Special::Tab,
            '\n' => Special::Newline,
            '\x0b' => Special::VerticalTab,
            '\x0c' => Special::FormFeed,
            '\r' => Special::CarriageReturn,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            Special::Dollar => b'$',
            Special::Semicolon => b';',
            Special::Hash => b'#',
            Special::Backslash => b'\\',
            Special::Pipe => b'|',
            Special::Ampersand => b'&',
            Special::Space => b' ',
            Special::Tab => b'\t',
            Special::Newline => b'\n',
            Special::VerticalTab => 0x0b,
            Special::FormFeed => 0x0c,
            Special::CarriageReturn => b'\r',
        }
    }

    fn name(self) -> &'static str {
        match self {
            Special::Dollar => "dg-dollar",
            Special::Semicolon => "dg-semicolon",
            Special::Hash => "dg-hash",
            Special::Backslash => "dg-backslash",
            Special::Pipe => "dg-pipe",
            Special::Ampersand => "dg-amp",
            Special::Space => "dg-space",
            Special::Tab => "dg-tab",
            Special::Newline => "dg-newline",
            Special::VerticalTab => "dg-vtab",
            Special::FormFeed => "dg-formfeed",
            Special::CarriageReturn => "dg-cr",
        }
    }

    fn reference(self) -> String {
        format!("${{{}:string}}", self.name())
    }
}

/// iPXE's `isspace`.
fn is_ipxe_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("the command line contains a NUL byte, which no kernel command line can hold")]
    Nul,
    #[error(
        "the command line word {word:?} contains `${{` followed by `}}`: iPXE expands every \
         such sequence (and re-expands the result), so it cannot reach the kernel unchanged; \
         put a space between `${{` and `}}` or change the job"
    )]
    Unrepresentable { word: String },
}

/// A command line in iPXE script syntax plus the settings it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscapedArgs {
    /// Tokens separated by single spaces, ready to follow the image URL on a `kernel` line.
    pub text: String,
    specials: BTreeSet<Special>,
}

impl EscapedArgs {
    /// `set` lines defining the settings the text refers to.
    pub fn set_lines(&self) -> String {
        let mut out = String::new();
        for s in &self.specials {
            let _ = writeln!(out, "set {}:hex {:02x}", s.name(), s.byte());
        }
        out
    }
}

/// Escapes `cmdline` so that iPXE's `kernel <url> <args>` hands exactly `cmdline` to the kernel.
pub fn escape_cmdline(cmdline: &str) -> Result<EscapedArgs, CmdlineError> {
    if cmdline.contains('\0') {
        return Err(CmdlineError::Nul);
    }
    let chars: Vec<char> = cmdline.chars().collect();
    let mut specials = BTreeSet::new();
    // (emitted token, decoded text) pairs.
    let mut tokens: Vec<(String, String)> = Vec::new();
    let mut tok = String::new();
    let mut dec = String::new();
    let mut encode = |c: char, tok: &mut String, dec: &mut String| {
        dec.push(c);
        match Special::of(c) {
            // A single `;`, `#` etc. are harmless inside a token, but always escaping them
            // keeps the rule simple and the script readable.
            Some(s) => {
                specials.insert(s);
                tok.push_str(&s.reference());
            }
            None => tok.push(c),
        }
    };
    let mut i = 0;
    while i < chars.len() {
        if is_ipxe_space(chars[i]) {
            let start = i;
            while i < chars.len() && is_ipxe_space(chars[i]) {
                i += 1;
            }
            let run = &chars[start..i];
            let between_words = start > 0 && i < chars.len();
            if between_words && run[0] == ' ' {
                // One literal space: a token boundary, which `kernel` turns back into one space.
                tokens.push((std::mem::take(&mut tok), std::mem::take(&mut dec)));
                for &c in &run[1..] {
                    encode(c, &mut tok, &mut dec);
                }
            } else {
                for &c in run {
                    encode(c, &mut tok, &mut dec);
                }
            }
        } else {
            encode(chars[i], &mut tok, &mut dec);
            i += 1;
        }
    }
    if !tok.is_empty() || tokens.is_empty() {
        tokens.push((tok, dec));
    }
    let mut text = String::new();
    for (n, (mut tok, dec)) in tokens.into_iter().enumerate() {
        if has_expansion(&dec) {
            return Err(CmdlineError::Unrepresentable { word: dec });
        }
        // A token that is exactly `||` or `&&` would end the command.
        if tok == "||" || tok == "&&" {
            let s = if tok == "||" {
                Special::Pipe
            } else {
                Special::Ampersand
            };
            specials.insert(s);
            tok = format!("{}{}", s.reference(), &tok[1..]);
        }
        if n > 0 {
            text.push(' ');
        }
        text.push_str(&tok);
    }
    Ok(EscapedArgs { text, specials })
}

/// True when iPXE would expand something in `s`: a `${` followed somewhere by a `}`.
fn has_expansion(s: &str) -> bool {
    s.find("${").is_some_and(|at| s[at + 2..].contains('}'))
}

/// Keeps text that goes into an `echo` line or a comment harmless and on one line.
pub fn sanitize_echo(text: &str) -> String {
    text.chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .,:/_=()'\"@+-<>[]".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// What a boot script boots.
#[derive(Debug, Clone)]
pub struct BootScript<'a> {
    /// One line saying what this is (machine, job), for the console.
    pub banner: &'a str,
    /// `pcbios`, `efi`, … as iPXE reported it; `None` when the URL did not say.
    pub platform: Option<&'a str>,
    pub kernel_url: &'a str,
    /// Initramfs URLs, in order.
    pub initrd_urls: &'a [String],
    pub cmdline: &'a str,
    /// Script to chain to after a failed download (fetches a fresh boot config).
    pub retry_url: &'a str,
    pub retry_delay_seconds: u64,
}

/// Name of the `index`-th initrd image inside iPXE (what `initrd=` refers to under EFI).
pub fn initrd_name(index: usize) -> String {
    format!("initrd{index}")
}

/// Renders the `#!ipxe` script for a boot config. URLs must be plain (no whitespace, no `$`).
pub fn render_boot_script(s: &BootScript<'_>) -> Result<String, CmdlineError> {
    let args = escape_cmdline(s.cmdline)?;
    // The EFI stub kernel finds its initramfs through `initrd=<name>` (this iPXE has no
    // LoadFile2 initrd protocol); under BIOS the argument is not needed, and leaving it out
    // keeps /proc/cmdline exactly the job's command line. Unknown platform: add it, it is
    // harmless under BIOS.
    let efi_initrd_args = if s.platform == Some("pcbios") {
        String::new()
    } else {
        (0..s.initrd_urls.len())
            .map(|i| format!("initrd={} ", initrd_name(i)))
            .collect()
    };
    let mut out = String::from("#!ipxe\n");
    let _ = writeln!(out, "echo dutgate: {}", sanitize_echo(s.banner));
    out.push_str(&args.set_lines());
    let sep = if args.text.is_empty() { "" } else { " " };
    let kernel_args = format!("{efi_initrd_args}{}", args.text);
    let _ = writeln!(
        out,
        "kernel {}{}{} || goto dg_failed",
        s.kernel_url,
        if kernel_args.is_empty() { "" } else { sep },
        kernel_args.trim_end_matches(' ')
    );
    for (i, url) in s.initrd_urls.iter().enumerate() {
        let _ = writeln!(
            out,
            "initrd --name {} {url} || goto dg_failed",
            initrd_name(i)
        );
    }
    out.push_str("boot || goto dg_failed\n");
    out.push_str(&retry_tail(
        "boot failed",
        s.retry_url,
        s.retry_delay_seconds,
    ));
    Ok(out)
}

/// A script that prints `message` and, after a delay, asks again (a DUT's firmware cannot
/// show an HTTP error page, and should keep trying until the gateway can answer).
pub fn render_retry_script(message: &str, retry_url: &str, delay_seconds: u64) -> String {
    let mut out = String::from("#!ipxe\n");
    let _ = writeln!(out, "echo dutgate: {}", sanitize_echo(message));
    out.push_str("goto dg_failed\n");
    out.push_str(&retry_tail("cannot boot", retry_url, delay_seconds));
    out
}

fn retry_tail(what: &str, retry_url: &str, delay_seconds: u64) -> String {
    // `imgfree` drops the kernel/initrds of the failed attempt (they would otherwise be
    // handed to the next kernel as extra initrds); `--replace` keeps the retry loop from
    // nesting one script inside the other forever.
    format!(
        ":dg_failed\n\
         echo dutgate: {what}, retrying in {delay_seconds} s\n\
         sleep {delay_seconds}\n\
         imgfree\n\
         chain --replace {retry_url} || goto dg_failed\n"
    )
}

/// A model of iPXE's line parser (rules 3–6 of the module docs), for tests and fuzzing: it
/// checks the escaping against iPXE's own algorithm. The QEMU test checks it against iPXE.
pub mod model {
    use std::collections::HashMap;

    /// Settings defined by `set name:hex xx` lines in `script`.
    pub fn settings(script: &str) -> HashMap<String, Vec<u8>> {
        let mut out = HashMap::new();
        for line in script.lines() {
            let mut it = line.split(' ');
            if it.next() == Some("set") {
                let (Some(name), Some(hex)) = (it.next(), it.next()) else {
                    continue;
                };
                let name = name.trim_end_matches(":hex").to_string();
                if let Ok(bytes) = hex::decode(hex) {
                    out.insert(name, bytes);
                }
            }
        }
        out
    }

    fn is_space(b: u8) -> bool {
        matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
    }

    fn expand(token: &[u8], settings: &HashMap<String, Vec<u8>>) -> Vec<u8> {
        let mut s = token.to_vec();
        loop {
            let mut start = None;
            let mut end = None;
            for i in 0..s.len() {
                if s[i] == b'$' && s.get(i + 1) == Some(&b'{') {
                    start = Some(i);
                }
                if start.is_some() && s[i] == b'}' {
                    end = Some(i);
                    break;
                }
            }
            let (Some(start), Some(end)) = (start, end) else {
                return s;
            };
            let name = String::from_utf8_lossy(&s[start + 2..end]).to_string();
            let name = name.trim_end_matches(":string");
            let value = settings.get(name).cloned().unwrap_or_default();
            let mut next = s[..start].to_vec();
            next.extend_from_slice(&value);
            next.extend_from_slice(&s[end + 1..]);
            s = next;
        }
    }

    /// The command line iPXE's `kernel` command would build from `args` (the text after the
    /// image URL). `None` when the line would be cut by a comment or command separator.
    pub fn kernel_cmdline(args: &str, settings: &HashMap<String, Vec<u8>>) -> Option<Vec<u8>> {
        let bytes = args.as_bytes();
        if bytes.last() == Some(&b'\\') || bytes.contains(&b'\n') {
            return None;
        }
        let tokens: Vec<&[u8]> = bytes
            .split(|b| is_space(*b))
            .filter(|t| !t.is_empty())
            .collect();
        let mut out = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if t[0] == b'#' || *t == b"||" || *t == b"&&" || *t == b";" {
                return None;
            }
            if i > 0 {
                out.push(b' ');
            }
            out.extend(expand(t, settings));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn through_ipxe(cmdline: &str) -> Vec<u8> {
        let e = escape_cmdline(cmdline).unwrap();
        let settings = model::settings(&e.set_lines());
        model::kernel_cmdline(&e.text, &settings).expect("line was cut")
    }

    #[test]
    fn plain_cmdline_is_left_alone() {
        let e = escape_cmdline("console=ttyS0,115200 quiet root=/dev/nfs").unwrap();
        assert_eq!(e.text, "console=ttyS0,115200 quiet root=/dev/nfs");
        assert_eq!(e.set_lines(), "");
    }

    #[test]
    fn specials_are_escaped() {
        let e = escape_cmdline("a;b #c d$e f\\").unwrap();
        assert_eq!(
            e.text,
            "a${dg-semicolon:string}b ${dg-hash:string}c d${dg-dollar:string}e f${dg-backslash:string}"
        );
        assert_eq!(
            e.set_lines(),
            "set dg-dollar:hex 24\nset dg-semicolon:hex 3b\nset dg-hash:hex 23\nset dg-backslash:hex 5c\n"
        );
    }

    #[test]
    fn lone_separators_are_escaped() {
        let e = escape_cmdline("x || y && z ; w").unwrap();
        assert_eq!(
            e.text,
            "x ${dg-pipe:string}| y ${dg-amp:string}& z ${dg-semicolon:string} w"
        );
    }

    #[test]
    fn whitespace_survives() {
        for s in [
            "a  b",
            " lead",
            "trail ",
            "a\tb",
            "a \t b",
            "   ",
            "",
            "x\ny\r",
            "a \u{b}\u{c}b",
        ] {
            assert_eq!(through_ipxe(s), s.as_bytes(), "{s:?}");
        }
    }

    #[test]
    fn quotes_and_non_ascii_pass_unchanged() {
        let s = r#"b2c.container="-ti docker://x/y:z ./run.sh" msg='héllo wörld' 名前=値"#;
        let e = escape_cmdline(s).unwrap();
        assert_eq!(e.text, s);
        assert_eq!(through_ipxe(s), s.as_bytes());
    }

    #[test]
    fn dollar_forms_that_ipxe_can_carry() {
        for s in [
            "$HOME", "a=${", "b=}", "c=}${", "d=$}{", "e=${ f=}", "g=$${;",
        ] {
            assert_eq!(through_ipxe(s), s.as_bytes(), "{s:?}");
        }
    }

    #[test]
    fn expansions_are_refused() {
        for s in [
            "${x}",
            "a=${b}c",
            "pre ${mac} post",
            "x=${a;b}",
            "q=\"${x}\"",
        ] {
            assert!(
                matches!(escape_cmdline(s), Err(CmdlineError::Unrepresentable { .. })),
                "{s:?}"
            );
        }
        // A tab joins its neighbours into one token, so this too would be expanded.
        assert!(escape_cmdline("a=${\tb=}").is_err());
        assert_eq!(escape_cmdline("a\0b"), Err(CmdlineError::Nul));
    }

    #[test]
    fn script_has_efi_initrd_names_and_retry() {
        let initrds = vec!["http://gw/artifacts/b/initrd.img".to_string()];
        let s = BootScript {
            banner: "52:54:00:12:34:56 job 7",
            platform: Some("efi"),
            kernel_url: "http://gw/artifacts/a/vmlinuz",
            initrd_urls: &initrds,
            cmdline: "console=ttyS0 x;y",
            retry_url: "http://gw/boot/52:54:00:12:34:56/boot.ipxe?platform=efi",
            retry_delay_seconds: 10,
        };
        let script = render_boot_script(&s).unwrap();
        assert!(script.starts_with("#!ipxe\n"), "{script}");
        assert!(script.contains("set dg-semicolon:hex 3b\n"), "{script}");
        assert!(
            script.contains(
                "kernel http://gw/artifacts/a/vmlinuz initrd=initrd0 console=ttyS0 x${dg-semicolon:string}y || goto dg_failed\n"
            ),
            "{script}"
        );
        assert!(script.contains(
            "initrd --name initrd0 http://gw/artifacts/b/initrd.img || goto dg_failed\n"
        ));
        assert!(script.contains("sleep 10\n"));
        assert!(
            script.contains(
                "chain --replace http://gw/boot/52:54:00:12:34:56/boot.ipxe?platform=efi"
            )
        );
        let bios = render_boot_script(&BootScript {
            platform: Some("pcbios"),
            ..s.clone()
        })
        .unwrap();
        assert!(bios.contains(
            "kernel http://gw/artifacts/a/vmlinuz console=ttyS0 x${dg-semicolon:string}y || goto"
        ));
        let empty = render_boot_script(&BootScript {
            platform: Some("pcbios"),
            cmdline: "",
            ..s
        })
        .unwrap();
        assert!(
            empty.contains("kernel http://gw/artifacts/a/vmlinuz || goto dg_failed\n"),
            "{empty}"
        );
    }

    #[test]
    fn echo_text_is_sanitized() {
        assert_eq!(sanitize_echo("bad ${mac}; x\ny"), "bad ??mac?? x?y");
    }

    proptest! {
        #[test]
        fn escaping_round_trips_or_refuses(s in "[ -~\t\n\r\u{b}\u{c}é名]{0,40}") {
            match escape_cmdline(&s) {
                Ok(e) => {
                    let settings = model::settings(&e.set_lines());
                    let got = model::kernel_cmdline(&e.text, &settings);
                    prop_assert_eq!(got, Some(s.as_bytes().to_vec()));
                }
                Err(CmdlineError::Unrepresentable { word }) => {
                    prop_assert!(has_expansion(&word));
                    prop_assert!(s.contains(word.trim_matches(is_ipxe_space)));
                }
                Err(CmdlineError::Nul) => prop_assert!(s.contains('\0')),
            }
        }

        #[test]
        fn unrepresentable_only_when_a_word_holds_an_expansion(s in "[a-z${}; ]{0,24}") {
            let words_expand = s.split(' ').any(has_expansion);
            prop_assert_eq!(escape_cmdline(&s).is_err(), words_expand);
        }
    }
}
