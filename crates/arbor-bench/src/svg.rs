//! Small SVG charts for the HTML report, drawn by hand: grouped bars with error whiskers and
//! line charts. No fonts or rasterizing needed; the browser lays out the text.

use std::fmt::Write;

const COLORS: &[&str] = &[
    "#2f6fb0", "#d9822b", "#3a9a5b", "#b33a3a", "#7b5ea7", "#6b6b6b",
];
const W: f64 = 760.0;
const H: f64 = 340.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 70.0;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum and tick step for data up to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| s * 5.0 >= max)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

fn frame(out: &mut String, title: &str, y_label: &str, y_max: f64, step: f64) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = TOP + plot_h * (1.0 - v / y_max);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
            W - RIGHT
        );
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        v += step;
    }
    let _ = write!(
        out,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#444"/>"##,
        TOP + plot_h,
        W - RIGHT,
        TOP + plot_h
    );
}

fn legend(out: &mut String, names: &[String]) {
    let mut x = LEFT;
    for (i, n) in names.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{c}"/>"#,
            H - 22.0
        );
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 16.0,
            H - 12.0,
            escape(n)
        );
        x += 30.0 + 7.0 * n.len() as f64;
    }
}

/// One series of a bar chart: its name and, per category, (mean, spread) if measured.
pub type BarSeries = (String, Vec<Option<(f64, f64)>>);

/// Grouped bars: one group per category, one bar per series; values are (mean, spread) and a
/// whisker shows the spread when it is finite.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[BarSeries],
) -> String {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .map(|(m, sd)| m + if sd.is_finite() { *sd } else { 0.0 })
        .fold(0.0, f64::max);
    let (y_max, step) = nice_axis(max);
    let mut out = String::new();
    frame(&mut out, title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group_w = plot_w / categories.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    for (ci, cat) in categories.iter().enumerate() {
        let gx = LEFT + group_w * ci as f64 + group_w * 0.1;
        for (si, (name, values)) in series.iter().enumerate() {
            let Some(Some((mean, sd))) = values.get(ci) else {
                continue;
            };
            let h = plot_h * mean / y_max;
            let x = gx + bar_w * si as f64;
            let y = TOP + plot_h - h;
            let c = COLORS[si % COLORS.len()];
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{c}"><title>{}: {}</title></rect>"#,
                bar_w - 2.0,
                escape(name),
                fmt_tick(*mean)
            );
            if sd.is_finite() && *sd > 0.0 {
                let cx = x + (bar_w - 2.0) / 2.0;
                let y1 = TOP + plot_h * (1.0 - (mean + sd) / y_max);
                let y2 = TOP + plot_h * (1.0 - (mean - sd).max(0.0) / y_max);
                let _ = write!(
                    out,
                    r##"<line x1="{cx:.1}" y1="{y1:.1}" x2="{cx:.1}" y2="{y2:.1}" stroke="#222"/>"##
                );
            }
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            TOP + plot_h + 16.0,
            escape(cat)
        );
    }
    legend(
        &mut out,
        &series.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
    );
    out.push_str("</svg>");
    out
}

/// Lines through (x, y) points, one per series.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (x_min, x_max, y_top) = pts.fold(
        (f64::INFINITY, f64::NEG_INFINITY, 0.0f64),
        |(a, b, c), &(x, y)| (a.min(x), b.max(x), c.max(y)),
    );
    let (y_max, step) = nice_axis(y_top);
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min, x_max)
    } else {
        (x_min.min(0.0), x_min.max(0.0) + 1.0)
    };
    let mut out = String::new();
    frame(&mut out, title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT - 20.0;
    let plot_h = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + 10.0 + plot_w * (x - x_min) / (x_max - x_min);
    let sy = |y: f64| TOP + plot_h * (1.0 - y / y_max);
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in &xs {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(*x),
            TOP + plot_h + 16.0,
            fmt_tick(*x)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        TOP + plot_h + 36.0,
        escape(x_label)
    );
    for (si, (name, points)) in series.iter().enumerate() {
        let c = COLORS[si % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(x, y) in points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{}: {}</title></circle>"#,
                sx(x),
                sy(y),
                escape(name),
                fmt_tick(y)
            );
        }
    }
    legend(
        &mut out,
        &series.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
    );
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round_and_cover_the_data() {
        assert_eq!(nice_axis(4.3), (5.0, 1.0));
        assert_eq!(nice_axis(0.37), (0.4, 0.1));
        let (max, step) = nice_axis(6835.0);
        assert!(max >= 6835.0 && step > 0.0 && max / step <= 6.0);
    }

    #[test]
    fn charts_are_svg_with_escaped_labels() {
        let s = bar_chart(
            "TTFT <s>",
            "s",
            &["a&b".into()],
            &[("x".into(), vec![Some((1.0, 0.1))])],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("TTFT &lt;s&gt;") && s.contains("a&amp;b"));
        let l = line_chart(
            "t",
            "turn",
            "s",
            &[("x".into(), vec![(1.0, 2.0), (2.0, 0.5)])],
        );
        assert_eq!(l.matches("<circle").count(), 2);
    }
}
