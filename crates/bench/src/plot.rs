//! An SVG of the ratios: one bar per figure (the median), a whisker for the
//! min–max spread over rounds, and a red mark at the goal. Drawn with
//! plotters' SVG backend, whose text is SVG text: no font files or system
//! font libraries are needed to make it.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::scenarios::Results;
use crate::stats::Spread;

const W: u32 = 1100;
const ROW: u32 = 30;
const LEFT: u32 = 430;
const RIGHT: u32 = 60;
const TOP: u32 = 70;

type Rgb = RGBColor;
const GREY: Rgb = RGBColor(200, 200, 200);
const RED: Rgb = RGBColor(210, 30, 30);
const BLUE: Rgb = RGBColor(60, 110, 190);
const GREEN: Rgb = RGBColor(60, 160, 90);
const ORANGE: Rgb = RGBColor(220, 140, 40);

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
        bars.push((
            format!("conn/s c={c}: connredir x haproxy"),
            p.vs_haproxy,
            Some(1.0),
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
            "bulk: connredir x haproxy".into(),
            b.vs_haproxy,
            None,
            GREEN,
        ));
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

/// Renders the plot as an SVG document.
pub fn render(r: &Results) -> Result<String> {
    let bars = bars(r);
    let h = TOP + bars.len().max(1) as u32 * ROW + 60;
    let mut svg = String::new();
    draw(&mut svg, h, r, &bars).map_err(|e| anyhow!("draw the plot: {e}"))?;
    Ok(svg)
}

/// Draws `bars` on an SVG canvas `W`×`h` written into `svg`.
fn draw(
    svg: &mut String,
    h: u32,
    r: &Results,
    bars: &[Bar],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let root = SVGBackend::with_string(svg, (W, h)).into_drawing_area();
    root.fill(&WHITE)?;
    // Monospace at 16 (plotters draws it at about 13 px) is about as wide as the 8-pixel cells the layout
    // was made for, so long labels stay left of the bars.
    let font = ("monospace", 16).into_font().color(&BLACK);
    // The SVG backend's rectangle spans [x0, x1) × [y0, y1), as the pixel
    // loops of the earlier bitmap did.
    let rect = |x0: u32, y0: u32, x1: u32, y1: u32, c: Rgb| {
        Rectangle::new([(x0 as i32, y0 as i32), (x1 as i32, y1 as i32)], c.filled())
    };
    let text = |x: u32, y: u32, s: String| Text::new(s, (x as i32, y as i32), font.clone());
    root.draw(&text(
        10,
        10,
        format!(
            "connredir benchmarks {}{}: median ratio, whisker min-max over rounds, red = goal",
            r.date,
            if r.quick { " (QUICK RUN)" } else { "" }
        ),
    ))?;
    root.draw(&text(
        10,
        26,
        format!("{} x{}, Linux {}", r.cpu, r.cores, r.kernel),
    ))?;
    let max = bars
        .iter()
        .map(|b| b.1.max.max(b.2.unwrap_or(0.0)))
        .fold(1.2f64, f64::max)
        .ceil()
        .min(20.0);
    let plot_w = W - LEFT - RIGHT;
    let x_of = |v: f64| LEFT + ((v.clamp(0.0, max) / max) * f64::from(plot_w)) as u32;
    // Grid every 0.25 (or 1 for wide ranges) with labels.
    let step = if max > 4.0 { 1.0 } else { 0.25 };
    let mut v = 0.0;
    let bottom = TOP + bars.len() as u32 * ROW;
    let centred = font.pos(Pos::new(HPos::Center, VPos::Top));
    while v <= max + 1e-9 {
        let x = x_of(v);
        root.draw(&rect(x, TOP - 6, x + 1, bottom, GREY))?;
        root.draw_text(&format!("{v:.2}"), &centred, (x as i32, bottom as i32 + 8))?;
        v += step;
    }
    let one = x_of(1.0);
    root.draw(&rect(one, TOP - 6, one + 2, bottom, BLACK))?;
    for (i, (label, s, goal, colour)) in bars.iter().enumerate() {
        let y = TOP + i as u32 * ROW;
        root.draw(&text(10, y + 8, label.clone()))?;
        root.draw(&text(LEFT - 90, y + 8, format!("{:.3}", s.median)))?;
        root.draw(&rect(LEFT, y + 6, x_of(s.median), y + ROW - 6, *colour))?;
        let (lo, hi) = (x_of(s.min), x_of(s.max));
        let mid = y + ROW / 2;
        root.draw(&rect(lo, mid - 1, hi + 1, mid + 1, BLACK))?;
        root.draw(&rect(lo, mid - 5, lo + 1, mid + 5, BLACK))?;
        root.draw(&rect(hi, mid - 5, hi + 1, mid + 5, BLACK))?;
        if let Some(g) = goal {
            let x = x_of(*g);
            root.draw(&rect(x.saturating_sub(1), y + 2, x + 2, y + ROW - 2, RED))?;
        }
    }
    root.draw(&text(
        LEFT,
        bottom + 26,
        "ratio (1.00 = as fast as the reference)".into(),
    ))?;
    root.present()
}

/// Writes the plot to `path`.
pub fn write(path: &Path, r: &Results) -> Result<()> {
    std::fs::write(path, render(r)?)?;
    Ok(())
}
