//! A PNG of the ratios: one bar per figure (the median), a whisker for the
//! min–max spread over rounds, and a red mark at the goal. Drawn into a
//! pixel buffer with a built-in 8×8 bitmap font, so no system fonts are
//! needed.

use std::path::Path;

use anyhow::Result;

use crate::scenarios::Results;
use crate::stats::Spread;

const W: usize = 1100;
const ROW: usize = 30;
const LEFT: usize = 430;
const RIGHT: usize = 60;
const TOP: usize = 70;

type Rgb = [u8; 3];
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [200, 200, 200];
const RED: Rgb = [210, 30, 30];
const BLUE: Rgb = [60, 110, 190];
const GREEN: Rgb = [60, 160, 90];
const ORANGE: Rgb = [220, 140, 40];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, c: Rgb) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, c);
            }
        }
    }

    /// Text at (x, y), each font pixel drawn `scale`×`scale`.
    fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, c: Rgb) {
        let glyphs = font8x8::legacy::BASIC_LEGACY;
        for (i, ch) in text.chars().enumerate() {
            let ch = match ch {
                '×' => 'x',
                '–' | '—' => '-',
                '≥' => '>',
                c if c.is_ascii() => c,
                _ => '?',
            };
            let glyph = glyphs[ch as usize];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        let (px, py) = (x + (i * 8 + col) * scale, y + row * scale);
                        self.rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }
}

/// (label, spread, goal, colour) per bar.
type Bar = (String, Spread, Option<f64>, Rgb);

fn bars(r: &Results) -> Vec<Bar> {
    let mut bars = Vec::new();
    if let Some(o) = &r.overhead {
        for (rules, s) in &o.ratios {
            bars.push((
                format!("overhead, {rules} rules x none"),
                *s,
                Some(0.97),
                BLUE,
            ));
        }
    }
    for p in &r.proxied {
        let c = p.concurrency;
        bars.push((
            format!("conn/s c={c}: connredir x nft"),
            p.vs_nft,
            Some(1.1),
            GREEN,
        ));
        bars.push((
            format!("conn/s c={c}: connredir x direct"),
            p.vs_direct,
            Some(0.45),
            GREEN,
        ));
        bars.push((
            format!("conn/s c={c}: nft x direct"),
            p.nft_vs_direct,
            None,
            ORANGE,
        ));
        bars.push((
            format!("conn/s c={c}: sockmap x direct"),
            p.sockmap_vs_direct,
            None,
            GREEN,
        ));
    }
    if let Some(b) = &r.bulk {
        bars.push((
            "bulk: connredir x direct".into(),
            b.vs_direct,
            Some(0.45),
            GREEN,
        ));
        bars.push(("bulk: connredir x nft".into(), b.vs_nft, None, GREEN));
        bars.push(("bulk: nft x direct".into(), b.nft_vs_direct, None, ORANGE));
        bars.push((
            "bulk: sockmap x direct".into(),
            b.sockmap_vs_direct,
            Some(1.0),
            GREEN,
        ));
        bars.push((
            "bulk: sockmap client leg x direct".into(),
            b.sockmap_client_leg_vs_direct,
            Some(0.9),
            GREEN,
        ));
    }
    bars
}

/// Renders the plot as PNG bytes.
pub fn render(r: &Results) -> Result<Vec<u8>> {
    let bars = bars(r);
    let h = TOP + bars.len().max(1) * ROW + 60;
    let mut c = Canvas::new(W, h);
    c.text(
        10,
        10,
        &format!(
            "connredir benchmarks {}{}: median ratio, whisker min-max over rounds, red = goal",
            r.date,
            if r.quick { " (QUICK RUN)" } else { "" }
        ),
        1,
        BLACK,
    );
    c.text(
        10,
        26,
        &format!("{} x{}, Linux {}", r.cpu, r.cores, r.kernel),
        1,
        BLACK,
    );
    let max = bars
        .iter()
        .map(|b| b.1.max.max(b.2.unwrap_or(0.0)))
        .fold(1.2f64, f64::max)
        .ceil()
        .min(20.0);
    let plot_w = W - LEFT - RIGHT;
    let x_of = |v: f64| LEFT + ((v.clamp(0.0, max) / max) * plot_w as f64) as usize;
    // Grid every 0.25 (or 1 for wide ranges) with labels.
    let step = if max > 4.0 { 1.0 } else { 0.25 };
    let mut v = 0.0;
    let bottom = TOP + bars.len() * ROW;
    while v <= max + 1e-9 {
        let x = x_of(v);
        c.rect(x, TOP - 6, x + 1, bottom, GREY);
        c.text(
            x.saturating_sub(12),
            bottom + 8,
            &format!("{v:.2}"),
            1,
            BLACK,
        );
        v += step;
    }
    let one = x_of(1.0);
    c.rect(one, TOP - 6, one + 2, bottom, BLACK);
    for (i, (label, s, goal, colour)) in bars.iter().enumerate() {
        let y = TOP + i * ROW;
        c.text(10, y + 8, label, 1, BLACK);
        c.text(LEFT - 90, y + 8, &format!("{:.3}", s.median), 1, BLACK);
        c.rect(LEFT, y + 6, x_of(s.median), y + ROW - 6, *colour);
        let (lo, hi) = (x_of(s.min), x_of(s.max));
        let mid = y + ROW / 2;
        c.rect(lo, mid - 1, hi + 1, mid + 1, BLACK);
        c.rect(lo, mid - 5, lo + 1, mid + 5, BLACK);
        c.rect(hi, mid - 5, hi + 1, mid + 5, BLACK);
        if let Some(g) = goal {
            let x = x_of(*g);
            c.rect(x.saturating_sub(1), y + 2, x + 2, y + ROW - 2, RED);
        }
    }
    c.text(
        LEFT,
        bottom + 26,
        "ratio (1.00 = as fast as the reference)",
        1,
        BLACK,
    );
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, W as u32, h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&c.px)?;
    }
    Ok(out)
}

/// Writes the plot to `path`.
pub fn write(path: &Path, r: &Results) -> Result<()> {
    std::fs::write(path, render(r)?)?;
    Ok(())
}
