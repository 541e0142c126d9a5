use super::*;

// ---------------------------------------------------------------------------
// Plots: hand-written SVG bar charts.
// ---------------------------------------------------------------------------

/// Enough for the per-packet chart's 16 series (the floor, then five paths
/// for each of three programs).
pub const COLORS: [&str; 16] = [
    "#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#e7969c", "#7b4173", "#5254a3",
];

/// Legend entries per row under a bar chart.
const LEGEND_COLUMNS: usize = 4;

/// A grouped bar chart: one group per label, one bar per series.
pub fn bar_chart(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    // Room for bars of at least 20 px and every legend row.
    let bars = (groups.len() * series.len()) as f64;
    let legend_rows = series.len().div_ceil(LEGEND_COLUMNS) as f64;
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 54.0 + 18.0 * legend_rows);
    let (plot_w, plot_h) = (f64::max(670.0, 20.0 / 0.8 * bars), 280.0);
    let (width, height) = (left + plot_w + right, top + plot_h + bottom);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    // A "nice" axis maximum: 1, 2 or 5 times a power of ten.
    let magnitude = 10f64.powf(max.log10().floor());
    let axis_max = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|m| *m >= max)
        .unwrap_or(max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        xml_escape(title)
    );
    for tick in 0..=5 {
        let value = axis_max * f64::from(tick) / 5.0;
        let y = top + plot_h - plot_h * f64::from(tick) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0,
            short_number(value)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        xml_escape(unit)
    );
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (g, label) in groups.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let h = plot_h * v / axis_max;
            let x = gx + bar_w * s as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}</title></rect>"#,
                top + plot_h - h,
                bar_w * 0.92,
                COLORS[s % COLORS.len()],
                short_number(v)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x + bar_w * 0.46,
                top + plot_h - h - 3.0,
                short_number(v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            xml_escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#333333"/>"##,
        left + plot_w,
        top + plot_h,
        top + plot_h
    );
    for (s, (name, _)) in series.iter().enumerate() {
        let x = left + (s % LEGEND_COLUMNS) as f64 * plot_w / LEGEND_COLUMNS as f64;
        let y = top + plot_h + 50.0 + (s / LEGEND_COLUMNS) as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 10.0,
            COLORS[s % COLORS.len()],
            x + 16.0,
            xml_escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn short_number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
