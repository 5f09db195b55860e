//! Writes `BENCHMARKS.md` from the results. Text after the notes marker in
//! an existing file (the analysis written by people) is kept.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::scenarios::{
    BpfCost, Results, VariantFigures, COST_REDIRECTED_TO_SINK, COST_UNSELECTED,
};
use crate::stats::Spread;

/// Everything after this line survives a rewrite.
pub const NOTES_MARKER: &str = "<!-- notes: kept when the benchmark rewrites this file -->";

/// A goal a figure should reach.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// At least this ratio.
    AtLeast(f64),
    /// Below this many bytes.
    Below(f64),
    /// At most this much (bytes, or a ratio where lower is better).
    AtMost(f64),
}

/// "met" or "missed by N %".
pub fn verdict(value: f64, goal: Goal) -> String {
    match goal {
        Goal::AtLeast(g) if value >= g => "met".into(),
        Goal::AtLeast(g) => format!("**missed** by {:.1} % of the goal", (g - value) / g * 100.0),
        Goal::Below(g) if value < g => "met".into(),
        Goal::Below(g) => format!("**missed** by {:.1} % of the goal", (value - g) / g * 100.0),
        Goal::AtMost(g) if value <= g => "met".into(),
        Goal::AtMost(g) => format!("**missed** by {:.1} % of the goal", (value - g) / g * 100.0),
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn us(s: &Spread) -> String {
    format!("{:.0} µs ({:.0}–{:.0})", s.median, s.min, s.max)
}

/// One row per program that ran in each case, then the case's total.
fn cost_table(o: &mut String, costs: &[BpfCost]) {
    let _ = writeln!(
        o,
        "| rules | connections | program | runs per connection | ns per run | ns per connection |\n|---|---|---|---|---|---|"
    );
    for c in costs {
        for p in &c.programs {
            let _ = writeln!(
                o,
                "| {} | {} | `{}` | {:.2} | {:.0} | {:.0} |",
                c.rules,
                c.case,
                p.program,
                p.runs,
                p.ns_per_run,
                p.ns()
            );
        }
        let _ = writeln!(
            o,
            "| {} | {} | **all programs** | | | **{:.0}** |",
            c.rules,
            c.case,
            c.total_ns()
        );
    }
    o.push('\n');
}

/// The summary rows: (figure, goal text, spread or value, verdict).
pub fn goals(r: &Results) -> Vec<(String, String, String, String)> {
    let mut rows = Vec::new();
    if let Some(o) = &r.overhead {
        if let Some((_, s)) = o.ratios.iter().find(|(n, _)| *n == 100_000) {
            rows.push((
                "connect+close rate, 100,000 rules, no match (× no programs)".into(),
                "≥ 0.97×".into(),
                s.ratio(),
                verdict(s.median, Goal::AtLeast(0.97)),
            ));
        }
        if let Some(c) = o
            .costs
            .iter()
            .find(|c| c.rules == 100_000 && c.case == COST_UNSELECTED)
        {
            rows.push((
                "BPF run time per connection no rule selects, 100,000 rules, all programs".into(),
                "≤ 200 ns".into(),
                format!("{:.0} ns", c.total_ns()),
                verdict(c.total_ns(), Goal::AtMost(200.0)),
            ));
        }
    }
    if let Some(c) = r.proxied.iter().find_map(|p| p.bpf_cost.as_ref()) {
        rows.push((
            "BPF run time per redirected connection, both ends (through the reference proxy)"
                .into(),
            "≤ 1 µs".into(),
            format!("{:.0} ns", c.total_ns()),
            verdict(c.total_ns(), Goal::AtMost(1000.0)),
        ));
    }
    for p in &r.proxied {
        rows.push((
            format!("new proxied conn/s, {} clients (× nftables)", p.concurrency),
            "≥ 1.05×".into(),
            p.vs_nft.ratio(),
            verdict(p.vs_nft.median, Goal::AtLeast(1.05)),
        ));
        let p99 = |name: &str| {
            p.variants
                .iter()
                .find(|v| v.name == name)
                .map_or(f64::NAN, |v| v.p99_us.median)
        };
        let p99_vs_nft = p99("connredir") / p99("nftables");
        rows.push((
            format!("p99 latency, {} clients (× nftables)", p.concurrency),
            "≤ 1.0×".into(),
            format!("{p99_vs_nft:.3}× (medians)"),
            verdict(p99_vs_nft, Goal::AtMost(1.0)),
        ));
        rows.push((
            format!("new proxied conn/s, {} clients (× direct)", p.concurrency),
            "≥ 0.45×".into(),
            p.vs_direct.ratio(),
            verdict(p.vs_direct.median, Goal::AtLeast(0.45)),
        ));
        rows.push((
            format!(
                "new proxied conn/s, {} clients (× haproxy on the layer)",
                p.concurrency
            ),
            "≥ 1.0×".into(),
            p.vs_haproxy.ratio(),
            verdict(p.vs_haproxy.median, Goal::AtLeast(1.0)),
        ));
    }
    if let Some(b) = &r.bulk {
        rows.push((
            "bulk throughput through the proxy (× direct)".into(),
            "≥ 0.45×".into(),
            b.vs_direct.ratio(),
            verdict(b.vs_direct.median, Goal::AtLeast(0.45)),
        ));
        rows.push((
            "bulk throughput through the proxy (× haproxy on the layer)".into(),
            "≥ 1.0×".into(),
            b.vs_haproxy.ratio(),
            verdict(b.vs_haproxy.median, Goal::AtLeast(1.0)),
        ));
        rows.push((
            "bulk throughput, sockmap, client-to-proxy leg accelerated (× direct)".into(),
            "≥ 0.9×".into(),
            b.sockmap_client_leg_vs_direct.ratio(),
            verdict(b.sockmap_client_leg_vs_direct.median, Goal::AtLeast(0.9)),
        ));
        rows.push((
            "bulk throughput, sockmap, both local legs accelerated (× direct)".into(),
            "≥ 1.1×".into(),
            b.sockmap_vs_direct.ratio(),
            verdict(b.sockmap_vs_direct.median, Goal::AtLeast(1.1)),
        ));
    }
    if let Some(m) = &r.memory {
        // Both ends of a redirected connection carry socket storage: the
        // client's socket and the one the service accepted.
        let per_socket = m.optmem_per_conn[1] / 2.0;
        rows.push((
            "kernel memory (BPF socket storage) per redirected socket".into(),
            "≤ 1 KiB".into(),
            format!("{per_socket:.0} B"),
            verdict(per_socket, Goal::AtMost(1024.0)),
        ));
        rows.push((
            "proxy RSS per idle proxied connection".into(),
            "< 16 KiB".into(),
            kib(m.rss_per_conn_redir),
            verdict(m.rss_per_conn_redir, Goal::Below(16.0 * 1024.0)),
        ));
        rows.push((
            "proxy RSS per idle proxied connection (× haproxy on the layer)".into(),
            "≤ 1.0×".into(),
            format!("{:.2}×", m.rss_per_conn_redir / m.rss_per_conn_haproxy),
            if m.rss_per_conn_redir <= m.rss_per_conn_haproxy {
                "met".into()
            } else {
                format!(
                    "**missed** by {:.1} % of the goal",
                    (m.rss_per_conn_redir / m.rss_per_conn_haproxy - 1.0) * 100.0
                )
            },
        ));
    }
    rows
}

fn variant_rows(out: &mut String, variants: &[VariantFigures], unit: &str, latency: bool) {
    let direct = variants[0].rate.median;
    let nft = variants
        .iter()
        .find(|v| v.name == "nftables")
        .map_or(f64::NAN, |v| v.rate.median);
    for v in variants {
        let _ = write!(
            out,
            "| {} | {:.1} {unit} ({:.1}–{:.1}) | {:.2}× | {:.2}× |",
            v.name,
            v.rate.median,
            v.rate.min,
            v.rate.max,
            v.rate.median / direct,
            v.rate.median / nft
        );
        if latency {
            let _ = write!(
                out,
                " {} | {} | {} |",
                us(&v.p50_us),
                us(&v.p99_us),
                v.errors
            );
        }
        out.push('\n');
    }
}

/// Renders the report.
pub fn render(r: &Results, notes: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Written by `scripts/bench` (the `connredir-bench` crate, release build) on {}.\n\n\
         Machine: {}, {} cores, Linux {}. The machine is shared and noisy; that is why every \
         figure is a ratio of runs interleaved in one process run (A B C, A B C, …, the order \
         rotated each round), quoted as the median over rounds with the min–max spread in \
         parentheses. Absolute rates drift with the neighbours' load; the ratios hold.\n",
        r.date, r.cpu, r.cores, r.kernel
    );
    if r.quick {
        let _ = writeln!(
            o,
            "> **Quick run** (`--quick`): few short rounds and small counts; a smoke test, not numbers to quote.\n"
        );
    }
    let _ = writeln!(
        o,
        "Everything runs on loopback inside network namespaces the benchmark creates and deletes, \
         in a cgroup tree it creates under the cgroup v2 root (programs are attached only there) \
         and removes at the end. Variants:\n\n\
         - **direct**: the client connects to the origin server.\n\
         - **connredir**: the client runs in a cgroup the layer is attached to; a rule sends its \
           connections to the reference proxy (`connredir-proxy`, splice relay after inspecting \
           the first bytes), which reads the records and original destination, and connects \
           onward carrying the records.\n\
         - **nftables**: in its own namespace, `nat output` rule `redirect to :15001` for the \
           origin's address (conntrack), the same proxy binary reading `SO_ORIGINAL_DST` from \
           conntrack (it finds no layer, so no records); its own connections are excluded by \
           `meta skuid`. The proxies run as an unprivileged uid in both paths.\n\
         - **sockmap**: the connredir path with the service's sockmap acceleration on, its own \
           engine, proxy and origin servers (inside its scope, so both local legs, client to \
           proxy and proxy to origin, move their data socket to socket without the TCP stack). \
           Once the proxy has inspected the client's first bytes it hands both directions to \
           the kernel (cut-through): from then on each end writes straight into the other's \
           receive queue, past the proxy.\n\
         - **sockmap-client-leg** (bulk only): the same accelerated proxy, for an origin outside \
           the scope, so only the client-to-proxy leg moves socket to socket; the proxy \
           splices from the origin's TCP socket into the accelerated client socket.\n\
         - **haproxy**: haproxy (the distribution's build) as the layer's service instead of \
           `connredir-proxy`: its own engine and scope, a rule for the same origins, haproxy \
           registered as the service by its cgroup. `option transparent` sends each connection \
           to its original destination, read with `SO_ORIGINAL_DST` (the layer answers it); \
           haproxy sets no records, so its onward connection is decided past it through the \
           layer's `inherit` map. Configured alike: TCP mode, 2 threads (the reference proxy's \
           runtime has one per core), splicing both directions (`option splice-request`, \
           `option splice-response`), the same idle timeout and connection cap (as far as the \
           descriptor limit allows), and one log line per connection (JSON: time, flow, original destination, bytes \
           each way, duration, how it ended) written to /dev/null as the reference proxy's log \
           is. It does not look at the first bytes (the reference proxy inspects them for its \
           rules and the log's protocol fields) and reads no records.\n"
    );
    let _ = writeln!(o, "![ratios](benchmarks.svg)\n");
    let _ = writeln!(o, "## Against the goals\n");
    let _ = writeln!(
        o,
        "| figure | goal | median (min–max) | |\n|---|---|---|---|"
    );
    for (figure, goal, value, verdict) in goals(r) {
        let _ = writeln!(o, "| {figure} | {goal} | {value} | {verdict} |");
    }
    o.push('\n');

    if let Some(ov) = &r.overhead {
        let _ = writeln!(o, "## 1. Layer overhead\n");
        let _ = writeln!(
            o,
            "A process in a cgroup opens and closes (with a reset) {} connections to an \
             accept-and-close server, one after the other; the connections match no rule \
             (one rule names the destination's /8 but another port, so the lookup finds a rule \
             set and walks it; the others are /32s in 10.0.0.0/8). Each configuration has its \
             own cgroup and its own loaded engine; the rate is divided by the same round's rate \
             in a cgroup without programs ({:.0} conn/s median).\n",
            ov.connects, ov.bare_rate
        );
        let _ = writeln!(
            o,
            "| rules | rate × no programs | rounds | BPF ns per connection no rule selects | BPF ns per redirected connection |\n|---|---|---|---|---|"
        );
        let total = |rules: usize, case: &str| {
            ov.costs
                .iter()
                .find(|c| c.rules == rules && c.case == case)
                .map_or("–".to_string(), |c| format!("{:.0}", c.total_ns()))
        };
        for (rules, s) in &ov.ratios {
            let _ = writeln!(
                o,
                "| {rules} | {} | {} | {} | {} |",
                s.ratio(),
                s.n,
                total(*rules, COST_UNSELECTED),
                total(*rules, COST_REDIRECTED_TO_SINK)
            );
        }
        o.push('\n');
        let _ = writeln!(
            o,
            "The BPF columns are the kernel's own account (each program's run time and runs, \
             kept while run-time statistics are on: `BPF_ENABLE_STATS`), read before and after \
             {} connections of each kind made after the timed rounds, one at a time: the same \
             connect+close to the sink (no rule selects it), and connect+close to a destination \
             the rule on 127.0.0.0/8 selects, redirected to an accept-and-close server running \
             as the service (it reads no records). They are far steadier on a busy machine than \
             the rates. Per program:\n",
            ov.costs.first().map_or(0, |c| c.connections)
        );
        cost_table(&mut o, &ov.costs);
    }

    if !r.proxied.is_empty() {
        let _ = writeln!(o, "## 2. Proxied connections\n");
        let _ = writeln!(
            o,
            "N clients at once, each in a loop: connect, send a {}-byte HTTP request, read the \
             {}-byte answer to the server's close, close. Latency is connect-to-first-byte of the \
             answer, per connection; p50/p99 per run, then median (min–max) over rounds. Ratios \
             in the table are of the medians; the goal rows above are medians of per-round ratios.\n",
            crate::worker::REQUEST.len(),
            crate::worker::RESPONSE.len()
        );
        for p in &r.proxied {
            let _ = writeln!(
                o,
                "### {} concurrent client{}\n",
                p.concurrency,
                if p.concurrency == 1 { "" } else { "s" }
            );
            let _ = writeln!(
                o,
                "| variant | conn/s | × direct | × nftables | p50 | p99 | failed |\n|---|---|---|---|---|---|---|"
            );
            variant_rows(&mut o, &p.variants, "/s", true);
            let _ = writeln!(
                o,
                "\nPer-round ratios: connredir × direct {}, connredir × nftables {}, nftables × direct {}, sockmap × direct {}, connredir × haproxy {}, haproxy × direct {}.\n",
                p.vs_direct.ratio(),
                p.vs_nft.ratio(),
                p.nft_vs_direct.ratio(),
                p.sockmap_vs_direct.ratio(),
                p.vs_haproxy.ratio(),
                p.haproxy_vs_direct.ratio()
            );
        }
    }

    if let Some(c) = r.proxied.iter().find_map(|p| p.bpf_cost.as_ref()) {
        let _ = writeln!(
            o,
            "BPF run time per connection of the connredir path, one client for {} connections \
             after the timed rounds, by the kernel's statistics as in section 1: both ends (the \
             client's socket, the socket the reference proxy accepts, its questions for the \
             records and the context, and its onward socket, which carries the records).\n",
            c.connections
        );
        cost_table(&mut o, std::slice::from_ref(c));
    }

    if let Some(b) = &r.bulk {
        let _ = writeln!(o, "## 3. Bulk throughput\n");
        let _ = writeln!(
            o,
            "One connection asks for {} MiB and reads it to the end (256 KiB reads); the proxy \
             inspects the first bytes, copies the first 64 KiB, then relays with splice(2) \
             (read(2) from sockmap-accelerated sockets; with both legs accelerated, the flow is \
             cut through once the request is inspected). Gbit/s from connect to the last byte.\n",
            b.bytes >> 20
        );
        let _ = writeln!(
            o,
            "| variant | throughput | × direct | × nftables |\n|---|---|---|---|"
        );
        variant_rows(&mut o, &b.variants, "Gbit/s", false);
        let _ = writeln!(
            o,
            "\nPer-round ratios: connredir × direct {}, connredir × nftables {}, nftables × direct {}, sockmap × direct {}, sockmap-client-leg × direct {}, connredir × haproxy {}, haproxy × direct {}.\n",
            b.vs_direct.ratio(),
            b.vs_nft.ratio(),
            b.nft_vs_direct.ratio(),
            b.sockmap_vs_direct.ratio(),
            b.sockmap_client_leg_vs_direct.ratio(),
            b.vs_haproxy.ratio(),
            b.haproxy_vs_direct.ratio()
        );
    }

    if let Some(m) = &r.memory {
        let _ = writeln!(o, "## 4. Memory\n");
        let _ = writeln!(
            o,
            "**Proxy resident memory.** {} idle proxied connections (the client sent a few bytes, \
             the origin holds the connection open and sends nothing) through the already warm \
             proxy; RSS from /proc/<pid>/status once its descriptor count stops growing. \
             A proxied connection costs the proxy 6 descriptors; with RLIMIT_NOFILE at {} \
             (raising it needs CAP_SYS_RESOURCE) at most {} connections are held.\n",
            m.rss_connections,
            r.nofile,
            10_000.min(r.nofile.saturating_sub(500) / 6)
        );
        let _ = writeln!(
            o,
            "| path | RSS before | with the connections | after they closed | per connection |\n|---|---|---|---|---|"
        );
        for (name, rss, per) in [
            ("connredir", m.rss_redir, m.rss_per_conn_redir),
            ("nftables", m.rss_nft, m.rss_per_conn_nft),
            ("haproxy", m.rss_haproxy, m.rss_per_conn_haproxy),
        ] {
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {} |",
                mib(rss[0] as f64),
                mib(rss[1] as f64),
                mib(rss[2] as f64),
                kib(per)
            );
        }
        let n = m.kernel_connections as f64;
        let per100k = |per: f64| mib(per * 100_000.0);
        let _ = writeln!(
            o,
            "\n**Kernel memory of redirected connections.** {} live connections (4 source \
             addresses, port range widened in the namespace) held open against an accept-only \
             sink, redirected to it by a rule (so both ends carry a record: the connecting \
             socket's and the accepted socket's), against the same number of direct connections; \
             {} round(s) of each. Per-socket BPF storage is charged to the socket's option memory \
             (`ss -m`, `o` field), not to the map's `memlock`, which counts only the maps' fixed \
             part.\n",
            m.kernel_connections, m.kernel_rounds
        );
        let _ = writeln!(o, "| reading | direct | redirected | layer's share, per 100,000 connections |\n|---|---|---|---|");
        let _ = writeln!(
            o,
            "| socket option memory (BPF socket storage) per connection | {:.0} B | {:.0} B | {} |",
            m.optmem_per_conn[0],
            m.optmem_per_conn[1],
            per100k(m.optmem_per_conn[1] - m.optmem_per_conn[0])
        );
        let _ = writeln!(
            o,
            "| slab growth per connection (both sockets, all kernel objects; noisy) | {:.0} B | {:.0} B | {} |",
            m.slab_per_conn[0],
            m.slab_per_conn[1],
            per100k(m.slab_per_conn[1] - m.slab_per_conn[0])
        );
        let _ = writeln!(
            o,
            "\nBPF map `memlock` (the maps of this scenario's engine, from fdinfo): {} before, {} with the {} connections, \
             {} after. Hand-off entries pending while they were open: {}. After closing: socket \
             option memory {} B in the namespace, slab {:+.1} MiB against before (other work on \
             the machine moves the slab too). Per connection over {:.0} connections.\n",
            kib(m.memlock[0] as f64),
            kib(m.memlock[1] as f64),
            m.kernel_connections,
            kib(m.memlock[2] as f64),
            m.pending_handoffs,
            m.optmem_after,
            m.slab_after_redir / (1024.0 * 1024.0),
            n
        );
    }
    if let Some(u) = &r.udp {
        udp_section(&mut o, u);
    }
    o.push_str(NOTES_MARKER);
    o.push('\n');
    o.push_str(notes);
    o
}

/// Writes the report to `path`, keeping the notes of an existing one.
pub fn write(path: &Path, r: &Results) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let notes = old
        .split_once(NOTES_MARKER)
        .map(|(_, notes)| notes.trim_start_matches('\n').to_string())
        .unwrap_or_default();
    std::fs::write(path, render(r, &notes))?;
    Ok(())
}

/// Section 5: DNS and UDP bulk through connredir-proxy UDP services.
fn udp_section(o: &mut String, u: &crate::scenarios::Udp) {
    let _ = writeln!(
        o,
        "## 5. UDP and DNS\n\n\
         The origin is dnsmasq (answering `{}` from its configuration, nothing upstream) on \
         {DNS_ORIGIN_TEXT} in the benchmark's namespace. N clients at once, each with one \
         connected UDP socket, in a loop: send an A query, wait for its answer (1 s at most), \
         check its id and code. Latency is query to answer. Variants: **direct**; **connredir, \
         1 service**: a UDP rule sends port 53 of the origin to `connredir-proxy --udp-listen` \
         (its own engine and scope), which reads each query as DNS, logs it (to /dev/null) and \
         relays it on its onward socket with the records; **connredir, 2 services**: two such \
         proxies chained (another engine and scope), each query passing both. The proxies run \
         as an unprivileged uid. The direct rate is what dnsmasq (one thread) and the client \
         reach together on this machine, well above the redirected variants' rates: the \
         services, not dnsmasq, bound those, so dnsmasq is kept as the origin (a real DNS \
         server) rather than an echo server.\n",
        crate::worker::DNS_NAME
    );
    for d in &u.dns {
        let _ = writeln!(
            o,
            "### DNS, {} concurrent client{}\n\n\
             | variant | queries/s | × direct | p50 | p99 | failed |\n|---|---|---|---|---|---|",
            d.concurrency,
            if d.concurrency == 1 { "" } else { "s" }
        );
        let direct = d.variants[0].rate.median;
        for v in &d.variants {
            let _ = writeln!(
                o,
                "| {} | {:.0} /s ({:.0}–{:.0}) | {:.2}× | {} | {} | {} |",
                v.name,
                v.rate.median,
                v.rate.min,
                v.rate.max,
                v.rate.median / direct,
                us(&v.p50_us),
                us(&v.p99_us),
                v.errors
            );
        }
        let _ = writeln!(
            o,
            "\nPer-round ratios: 1 service × direct {}, 2 services × direct {}.\n",
            d.one_vs_direct.ratio(),
            d.two_vs_direct.ratio()
        );
    }
    let _ = writeln!(
        o,
        "### UDP bulk\n\n\
         One connected UDP socket sends {} in datagrams of {} bytes, {} in flight, to a UDP \
         echo server, and reads the echoes (a datagram without an echo in 200 ms is counted \
         lost; a run losing more than a tenth fails). Gbit/s of data echoed, direct and \
         through one service (the same `connredir-proxy`, relaying the flow without reading it \
         as DNS).\n\n\
         | variant | Gbit/s | × direct |\n|---|---|---|",
        mib(u.bulk_bytes as f64),
        u.bulk_datagram,
        u.bulk_window
    );
    let direct = u.bulk[0].rate.median;
    for v in &u.bulk {
        let _ = writeln!(
            o,
            "| {} | {:.2} ({:.2}–{:.2}) | {:.2}× |",
            v.name,
            v.rate.median,
            v.rate.min,
            v.rate.max,
            v.rate.median / direct
        );
    }
    let _ = writeln!(
        o,
        "\nPer-round ratio: 1 service × direct {}.\n",
        u.bulk_vs_direct.ratio()
    );
}

/// Where the UDP scenario's DNS origin listens, as the report says it.
const DNS_ORIGIN_TEXT: &str = "127.0.0.5:53";
