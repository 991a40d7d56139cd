"""Loss-space plots, comparison tables, and the compare / sweep runs that produce them."""

from bipost.report.loss_space import plot_fronts, plot_trajectories
from bipost.report.tables import comparison_rows, markdown

__all__ = ["comparison_rows", "markdown", "plot_fronts", "plot_trajectories"]
