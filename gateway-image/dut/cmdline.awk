# Prints the value of the kernel parameter KEY (awk -v KEY=name) from /proc/cmdline, splitting
# like the kernel does: spaces separate parameters except inside double quotes, and quotes
# around a value are removed. Exit status 1 when KEY is absent.
function emit(tok,    eq, k, v) {
    if (tok == "") return
    eq = index(tok, "=")
    if (eq == 0) return
    k = substr(tok, 1, eq - 1)
    v = substr(tok, eq + 1)
    if (length(v) >= 2 && substr(v, 1, 1) == "\"" && substr(v, length(v), 1) == "\"")
        v = substr(v, 2, length(v) - 2)
    if (k == KEY && !found) { print v; found = 1 }
}
{
    s = $0; tok = ""; inq = 0
    for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "\"") inq = !inq
        if ((c == " " || c == "\n") && !inq) { emit(tok); tok = "" } else tok = tok c
    }
    emit(tok)
}
END { exit(found ? 0 : 1) }
