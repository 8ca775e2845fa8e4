//! One-line summaries of long agent errors (verifier logs) and of failed test output.

/// One line out of an agent error: the message up to "Verifier output:", plus, for a
/// verifier rejection, the last instruction and the verifier's complaint.
pub fn summarize_error(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let head = lines
        .iter()
        .position(|l| *l == "Caused by:")
        .and_then(|i| lines.get(i + 1))
        .or_else(|| lines.iter().find(|l| l.contains("Verifier output:")))
        .or_else(|| lines.iter().rev().find(|l| !l.is_empty()))
        .copied()
        .unwrap_or("");
    let head = head.split("Verifier output:").next().unwrap_or(head).trim();
    if !text.contains("Verifier output:") {
        return head.to_string();
    }
    let end = lines
        .iter()
        .position(|l| l.starts_with("verification time"))
        .unwrap_or(lines.len());
    let is_insn = |l: &str| {
        l.split(':')
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut why = Vec::new();
    let mut insn = None;
    // Register-state dumps (5.10 prints one before the complaint) say little in one line.
    let is_state = |l: &str| {
        l.contains("R10=fp0")
            || (l.starts_with('R') && l.split_whitespace().next().is_some_and(|w| w.contains('=')))
    };
    for l in lines[..end].iter().rev() {
        if let Some((_, rest)) = l.split_once("Verifier output:") {
            if !rest.trim().is_empty() && !is_state(rest) {
                why.push(rest.trim());
            }
            break;
        }
        if l.is_empty() || is_state(l) {
            continue;
        }
        if is_insn(l) {
            insn = Some(l.split(';').next().unwrap_or(l).trim());
            break;
        }
        why.push(*l);
    }
    why.reverse();
    format!(
        "{head} verifier: {}{}",
        insn.map(|i| format!("at `{i}`: ")).unwrap_or_default(),
        why.join("; ")
    )
}

/// The panic message of a failed test case and the mismatch lines under it.
pub fn panic_summary(output: &str) -> String {
    let mut lines = output.lines().skip_while(|l| !l.contains("panicked at"));
    lines.next();
    let mut parts: Vec<&str> = Vec::new();
    if let Some(msg) = lines.next() {
        parts.push(msg.trim());
    }
    parts.extend(lines.take_while(|l| l.starts_with("  /")).map(str::trim));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_error_summary() {
        let log = "Error: attaching the probes\n\nCaused by:\n    --probe-mode kprobe: refused: \
                   the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                   Verifier output: 0: R1=ctx(off=0,imm=0) R10=fp0\n    466: (bf) r2 = r9\n    \
                   R9 !read_ok\n    verification time 12225 usec\n    processed 727 insns\n";
        assert_eq!(
            summarize_error(log),
            "--probe-mode kprobe: refused: the BPF_PROG_LOAD syscall returned Permission \
             denied (os error 13). verifier: at `466: (bf) r2 = r9`: R9 !read_ok"
        );
        assert_eq!(summarize_error("no such file"), "no such file");
        let early = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                     Verifier output: combined stack size of 4 calls is 544. Too large\n\
                     verification time 20 usec\n";
        assert_eq!(
            summarize_error(early),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: \
             combined stack size of 4 calls is 544. Too large"
        );
    }
}
